"""Average the weights of several checkpoints of one run (stochastic weight averaging, SWA).

The last epochs of a cosine schedule wander around a minimum; their mean usually sits closer to
its centre and generalises better than any one of them, at no inference cost (one network).
The float weights are averaged; BatchNorm's running statistics of an average are not the average
of the statistics, so they are re-estimated on training images (centre crop, no augmentation,
the whole training set once, cumulative mean). The result is an ordinary fer-batch checkpoint
(arguments, preprocessing and history from the last input; ``averaged_from`` lists the inputs).

    fer-batch train ... --out runs/fp3_vgg32 --keep-epochs
    python examples/ferplus/average_weights.py runs/fp3_vgg32/epochs/ep{12..19}.pt \\
        --data ../shared/data/ferplus/ferplus.parquet --where fer_usage=Training --out runs/swa/best.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fer_batch.models import sha256_file
from fer_batch.preprocess import PreprocessSpec, prepare
from fer_batch.train.checkpoints import CKPT_FORMAT, load_checkpoint, save_checkpoint
from fer_batch.train.data import load_dataset
from fer_batch.train.engine import TrainArgs, _make_model, two_heads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+", help="checkpoints of one run (same architecture)")
    ap.add_argument("--data", required=True, help="training data for BatchNorm re-estimation")
    ap.add_argument("--where", default="", help="Parquet row filter, as fer-batch train --where")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    cks = [load_checkpoint(p) for p in a.ckpts]
    base = cks[-1]
    for p, ck in zip(a.ckpts, cks):
        if ck.get("format") != CKPT_FORMAT or set(ck["model"]) != set(base["model"]):
            raise SystemExit(f"{p}: not a checkpoint of the same network as {a.ckpts[-1]}")
    state = {}
    for name, v in base["model"].items():
        if v.is_floating_point():
            state[name] = torch.stack([ck["model"][name].float() for ck in cks]).mean(0).to(v.dtype)
        else:
            state[name] = v.clone()
    args = TrainArgs.from_dict(json.loads(base["args"]))
    spec = PreprocessSpec.from_dict(json.loads(base["preprocess"]))
    k = len(base["labels"])
    model = _make_model(args, spec, 2 * k if two_heads(args) else k)
    model.load_state_dict(state)
    ds = load_dataset(a.data, spec.size, spec.colour, where=a.where or None)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative mean over all batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(ds.images), a.batch_size):
            model(torch.from_numpy(prepare(ds.images[i : i + a.batch_size], spec)))
    model.eval()
    for m in bns:
        m.momentum = 0.1
    payload = dict(base)
    payload["model"] = {n: v.detach().cpu().contiguous() for n, v in model.state_dict().items()}
    payload["averaged_from"] = json.dumps({
        "checkpoints": [{"file": Path(p).name, "sha256": sha256_file(Path(p)), "epoch": int(ck.get("epoch", -1)) + 1} for p, ck in zip(a.ckpts, cks)],
        "bn_images": len(ds.images), "command": "python examples/ferplus/average_weights.py " + " ".join(
            [*(str(Path(p).parent.name) + "/" + Path(p).name for p in a.ckpts), "--data", Path(a.data).name]
            + (["--where", a.where] if a.where else [])),
    })  # fmt: skip
    for key in ("optimizer", "scheduler", "scaler", "rng"):
        payload.pop(key, None)
    save_checkpoint(a.out, payload)
    print(f"{a.out}: mean of {len(cks)} checkpoints, BatchNorm re-estimated on {len(ds.images)} images in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
