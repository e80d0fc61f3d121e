"""Read one member of a shipped VGG ensemble back into a fer-batch checkpoint.

Training checkpoints are not kept in the repository (``runs/`` is not versioned), so a new
ensemble that reuses a shipped member (e.g. the 48-wide network of ``vgg_ferplus`` next to a
newly trained 32-wide one) needs that member as a checkpoint for ``select_model.py`` and
``fer-batch export``. The weights come from the ONNX file exactly as ``--init onnx:NAME#K``
reads them (BatchNorm re-created, equal in eval mode); the run arguments come from a checkpoint
of the same recipe (``--like``) with the member's widths; the card's record of the member
(recipe, epochs, validation F1, train seconds) is kept under ``derived_from`` and
``fer-batch export`` copies it into the new card.

A two-head member keeps both heads in the exported graph (its Gemm has 2 x 7 rows, mixed
after it), so the checkpoint is the whole two-head network and ``--head-mix`` still applies.

    python examples/ferplus/ckpt_from_onnx.py vgg_ferplus 1 --like runs/fp2_vgg32/last.pt --out runs/vgg_ferplus_m1.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from fer_batch.models import registry
from fer_batch.train.checkpoints import CKPT_FORMAT, load_checkpoint, save_checkpoint
from fer_batch.train.engine import TrainArgs, _make_model, two_heads
from fer_batch.train.onnx_init import init_vgg_from_onnx, member_weights, resolve_onnx
from fer_batch.types import EMOTIONS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="registered model name (a fer-batch VGG ensemble export)")
    ap.add_argument("member", type=int)
    ap.add_argument("--like", required=True, help="a checkpoint of the same recipe (arguments, preprocessing)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    card = registry().get(a.model).verify()
    onnx_path, k = resolve_onnx(f"{a.model}#{a.member}")
    like = load_checkpoint(a.like)
    args = TrainArgs.from_dict(json.loads(like["args"]))
    convs, (hw, _) = member_weights(onnx_path, k)
    widths = []
    for i in sorted(convs):
        c = int(convs[i][0].shape[0])
        if not widths or widths[-1] != c:
            widths.append(c)
    record = {}
    members = (card.provenance or {}).get("members") or []
    if a.member < len(members):
        record = dict(members[a.member])
    args = dataclasses.replace(args, arch={**args.arch, "widths": widths}, init=f"onnx:{a.model}#{a.member}",
                               command=record.get("recipe", f"(member {a.member} of {a.model})"))  # fmt: skip
    from fer_batch.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(json.loads(like["preprocess"]))
    model = _make_model(args, spec, 2 * len(EMOTIONS) if two_heads(args) else len(EMOTIONS))
    # BatchNorm is re-created to reproduce the folded convolutions exactly in eval mode whatever
    # the calibration images; these are uniform noise at the input's scale.
    size = spec.crop or spec.size
    calib = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (256, 1, size, size)).astype(np.float32))
    init_vgg_from_onnx(model, onnx_path, k, calib)
    payload = {
        "format": CKPT_FORMAT, "model": {n: v.detach().cpu().contiguous() for n, v in model.state_dict().items()},
        "epoch": int(record.get("epochs_run", 1)) - 1, "best_f1": float(record.get("val_macro_f1", float("nan"))),
        "best_epoch": int(record.get("best_epoch", 0)) - 1, "args": json.dumps(args.to_dict()), "labels": list(EMOTIONS),
        "preprocess": like["preprocess"], "history": "[]", "val_metrics": "{}", "torch": str(torch.__version__),
        "spent_s": float(record.get("train_seconds", 0.0)),
        "derived_from": json.dumps({"model": a.model, "member": a.member, "onnx_sha256": card.sha256, "record": record}),
    }  # fmt: skip
    save_checkpoint(a.out, payload)
    print(f"{a.out}: member {a.member} of {a.model} (widths {widths}, head {hw.shape})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
