"""Read trained teachers on every face of the unpacked pack (mirror-image average) and score them.

Runs where the teachers were trained (the lent GPU machine), or here on the CPU (a smoke test,
or checkpoints trained here as teachers, reading the lossless ``ferplus.parquet`` directly). Writes one ``.npz`` with ``src_row`` (rows of ``ferplus.parquet``), ``names``,
``probs`` (teachers x faces x 7, float16, ``fer_batch.types.EMOTIONS`` order) and ``usage``, and
prints, per teacher and for their mean, the FER+ PublicTest accuracy / macro-F1 / NLL against
the votes (the pack's JPEG copies: a little below what the lossless images give).

    python3 examples/ferplus/device/teacher_probs.py RUN1/best.pt RUN2/best.pt --data fp.parquet --out probs.npz
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from fer_batch.train.checkpoints import load_checkpoint
from fer_batch.train.data import load_dataset
from fer_batch.train.engine import model_from_checkpoint, predict, resolve_device
from fer_batch.train.metrics import probs_metrics
from fer_batch.types import EMOTIONS


def score(p: np.ndarray, labels: np.ndarray, targets: np.ndarray) -> dict:
    m = probs_metrics(p, labels, targets)
    return {"acc": round(m["accuracy"], 4), "f1": round(m["macro_f1"], 4), "nll": round(m["nll"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--data", required=True, help="the Parquet `pack.py unpack` wrote, or ferplus.parquet itself")
    ap.add_argument("--where", default=None, help="e.g. fer_usage=Training,PublicTest (for ferplus.parquet)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-tta", action="store_true")
    a = ap.parse_args()

    device = resolve_device(a.device)
    ds = load_dataset(a.data, 48, "gray", where=a.where)
    pf = pq.ParquetFile(a.data)
    t = pf.read(columns=[c for c in ("src_row", "fer_usage") if c in pf.schema_arrow.names])
    # rows of ferplus.parquet: the pack's src_row column, or the row itself when reading ferplus.parquet
    src_row = np.asarray(t.column("src_row").to_numpy())[ds.rows] if "src_row" in t.column_names else ds.rows
    usage = np.asarray(t.column("fer_usage").to_pylist(), object)[ds.rows]
    val = usage == "PublicTest"
    names, probs, report = [], [], {}
    for c in a.ckpts:
        model, spec, labels = model_from_checkpoint(load_checkpoint(c), head_mix=1.0)
        model.to(device)
        with torch.inference_mode():
            p = predict(model, ds.images, spec, batch_size=1024, tta=not a.no_tta, device=device)
        p = p[:, [labels.index(e) for e in EMOTIONS]]
        name = Path(c).parent.name
        names.append(name)
        probs.append(p)
        report[name] = score(p[val], ds.labels[val], ds.targets[val])
        print(name, json.dumps(report[name]), flush=True)
    mean = np.mean(probs, 0)
    report["mean"] = score(mean[val], ds.labels[val], ds.targets[val])
    print("mean of all", json.dumps(report["mean"]), flush=True)
    out = Path(a.out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, src_row=src_row.astype(np.int32), names=np.asarray(names), probs=np.stack(probs).astype(np.float16),
                            usage=np.asarray([str(u) for u in usage]), tta=np.bool_(not a.no_tta),
                            report=np.asarray(json.dumps(report)))
    os.replace(tmp, out)
    print(f"{out}: {len(names)} teachers x {len(src_row)} faces")


if __name__ == "__main__":
    main()
