"""Distillation data: FER+ Training with targets = a x votes + (1 - a) x the teachers' mean.

Joins ``teacher_probs.npz`` (from ``teacher.sh`` on a lent GPU) onto the lossless images of
``ferplus.parquet`` by ``src_row`` and writes a Parquet that ``fer-batch train`` reads as vote
data: ``p_<emotion>`` columns (the blended distribution), ``image``, ``fer_usage``,
``fer2013_label`` (for the student's FER2013 head) and ``pixel_md5``. Rows that the vote reader
skips in ``ferplus.parquet`` (mostly unknown / not a face, no emotion vote) are left out here too,
so the student trains on the same faces as before, only with better targets.

    python examples/ferplus/device/distill_data.py runs/device/teacher_probs.npz --alpha 0.5 --out runs/fp_distill.parquet
    fer-batch train runs/fp_distill.parquet --val ../shared/data/ferplus/ferplus.parquet --val-where fer_usage=PublicTest ...
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fer_batch.train.data import LoadReport, read_votes, vote_columns
from fer_batch.types import EMOTIONS

REPO = Path(__file__).resolve().parents[3]
SHARED = Path(os.environ.get("FER_BATCH_SHARED", REPO.parent / "shared")) / "data"


def blend(votes: np.ndarray, teachers: np.ndarray, alpha: float, temperature: float = 1.0) -> np.ndarray:
    """alpha x votes + (1 - alpha) x mean over teachers of p**(1/T) renormalised; rows sum to 1."""
    t = np.asarray(teachers, np.float64)
    if temperature != 1.0:
        t = np.clip(t, 1e-12, 1.0) ** (1.0 / temperature)
        t /= t.sum(-1, keepdims=True)
    t = t.mean(0)
    t /= t.sum(1, keepdims=True)
    return (alpha * votes + (1.0 - alpha) * t).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probs", help="teacher_probs.npz")
    ap.add_argument("--data", default=str(SHARED / "ferplus/ferplus.parquet"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--alpha", type=float, default=0.5, help="share of the annotators' votes in the target")
    ap.add_argument("--teachers", default="", help="comma-separated teacher names (default: all in the file)")
    ap.add_argument("--temperature", type=float, default=1.0, help="soften (>1) the teachers' probabilities")
    a = ap.parse_args()
    if not 0.0 <= a.alpha <= 1.0:
        raise SystemExit("--alpha must be in [0, 1]")

    z = np.load(a.probs, allow_pickle=False)
    names = [str(n) for n in z["names"]]
    pick = [names.index(n) for n in a.teachers.split(",")] if a.teachers else list(range(len(names)))
    train = np.asarray([str(u) for u in z["usage"]]) == "Training"
    src = z["src_row"][train].astype(np.int64)
    teach = z["probs"][pick][:, train].astype(np.float32)

    t = pq.read_table(a.data)
    emo, extra = vote_columns(t.column_names)
    sub = t.take(pa.array(src))
    report = LoadReport(a.data)
    votes, _, ok = read_votes(sub, emo, extra, report)
    target = blend(votes[ok], teach[:, ok], a.alpha, a.temperature)
    sub = sub.filter(pa.array(ok))
    cols = {c: sub.column(c) for c in ("image", "fer_usage", "fer2013_label", "pixel_md5") if c in sub.column_names}
    cols.update({f"p_{e}": pa.array(target[:, i]) for i, e in enumerate(EMOTIONS)})
    meta = {"teachers": ",".join(names[i] for i in pick), "alpha": str(a.alpha), "temperature": str(a.temperature),
            "teacher_report": str(z["report"]), "skipped": json.dumps(dict(report.skipped_votes))}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.table(cols).replace_schema_metadata(meta), tmp)
    os.replace(tmp, out)
    print(f"{out}: {int(ok.sum())} Training faces (skipped {dict(report.skipped_votes)}), teachers {meta['teachers']}, "
          f"alpha {a.alpha}, T {a.temperature}")


if __name__ == "__main__":
    main()
