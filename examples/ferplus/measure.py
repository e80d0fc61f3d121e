"""Measure a registered emotion model once on every test set and write the numbers into its card.

Each number is produced by ``fer_batch.train.evaluate.run`` (what ``fer-batch evaluate`` runs) and
stored with the equivalent command. Test sets: FER+ PrivateTest (majority labels, NLL/ECE
against the votes; with and without the test images that copy a Training image), FER2013 test
with its original labels (all 7,178 images, and PrivateTest alone), and the posed colour photos
through detect + align (a validation set: reported, the choice was made on it too).

    python examples/ferplus/measure.py vgg_ferplus [--write]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import yaml

from fer_batch.train.data import load_dataset
from fer_batch.train.engine import metrics_from, vote_metrics
from fer_batch.train.evaluate import run

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FER_BATCH_SHARED", REPO.parent / "shared")) / "data"
FERPLUS = SHARED / "ferplus/ferplus.parquet"
FER2013 = SHARED / "fer2013/fer2013_test.parquet"
POSED = SHARED / "posed_taiwanese/taiwanese_posed.parquet"


def _short(m: dict) -> dict:
    out = {"n": m["n"], "accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
           "recall": {e: round(v["recall"], 3) for e, v in m["per_class"].items()}}
    ni = m["labels"].index("neutral")
    row = m["confusion"][ni]
    out["neutral_read_as"] = {e: int(row[m["labels"].index(e)]) for e in ("sad", "angry", "fear")} | {"of": int(sum(row))}
    for k in ("nll", "ece", "nll_all", "ece_all", "no_majority", "no_prediction"):
        if k in m:
            out[k] = round(m[k], 4) if isinstance(m[k], float) else m[k]
    return out


def measure(name: str, threads: int, tmp: Path) -> dict:
    res = {}
    pred = tmp / f"{name}_ferplus_private.parquet"
    m = run(name, str(FERPLUS), where="fer_usage=PrivateTest", threads=threads, predictions=pred)
    res["ferplus_privatetest"] = {**_short(m), "command": f"fer-batch evaluate {name} ferplus/ferplus.parquet --where fer_usage=PrivateTest"}
    m_raw = run(name, str(FERPLUS), where="fer_usage=PrivateTest", threads=threads, calibrated=False)
    res["ferplus_privatetest_uncalibrated"] = {"nll": round(m_raw["nll"], 4), "ece": round(m_raw["ece"], 4),
                                               "command": res["ferplus_privatetest"]["command"] + " --uncalibrated"}
    # without the PrivateTest images that are pixel copies of Training images
    train_keys = set(load_dataset(FERPLUS, 48, "gray", where="fer_usage=Training").keys.astype(str))
    ds = load_dataset(FERPLUS, 48, "gray", where="fer_usage=PrivateTest")
    import pyarrow.parquet as pq

    p = pq.read_table(pred).to_pandas()
    probs = p[[c for c in p.columns if c.startswith("p_")]].to_numpy()
    keep = ~np.isin(ds.keys.astype(str), list(train_keys)) & (ds.labels >= 0)
    mm = metrics_from(ds.labels[keep], probs[keep].argmax(1))
    vv = vote_metrics(probs[keep], ds.targets[keep])
    res["ferplus_privatetest_nodup"] = {"n": int(keep.sum()), "excluded": int(((ds.labels >= 0) & ~keep).sum()),
                                        "accuracy": round(mm["accuracy"], 4), "macro_f1": round(mm["macro_f1"], 4),
                                        "nll": round(vv["nll"], 4), "ece": round(vv["ece"], 4),
                                        "command": res["ferplus_privatetest"]["command"] + " --predictions P.parquet, then rows whose pixel_md5 is not in Training"}
    m = run(name, str(FER2013), threads=threads)
    res["fer2013_test"] = {**_short(m), "command": f"fer-batch evaluate {name} fer2013/fer2013_test.parquet"}
    m = run(name, str(FER2013), where="fer_usage=PrivateTest", threads=threads)
    res["fer2013_privatetest"] = {**_short(m), "command": f"fer-batch evaluate {name} fer2013/fer2013_test.parquet --where fer_usage=PrivateTest"}
    m = run(name, str(POSED), detect=True, threads=threads)
    res["posed_taiwanese_detect"] = {**_short(m), "command": f"fer-batch evaluate {name} posed_taiwanese/taiwanese_posed.parquet --detect"}
    sub = run(name, str(FER2013), tta=False, threads=threads, every=7)
    res["regression_subset"] = {"data": "fer2013_test.parquet", "every": 7, "n": sub["n"], "accuracy": round(sub["accuracy"], 4),
                                "macro_f1": round(sub["macro_f1"], 4), "command": f"fer-batch evaluate {name} fer2013/fer2013_test.parquet --no-tta --every 7"}
    sub = run(name, str(FERPLUS), tta=False, threads=threads, every=7, where="fer_usage=PrivateTest")
    res["regression_subset_ferplus"] = {"data": "ferplus.parquet", "where": "fer_usage=PrivateTest", "every": 7, "n": sub["n"],
                                        "accuracy": round(sub["accuracy"], 4), "macro_f1": round(sub["macro_f1"], 4), "nll": round(sub["nll"], 4),
                                        "command": f"fer-batch evaluate {name} ferplus/ferplus.parquet --where fer_usage=PrivateTest --no-tta --every 7"}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="Write the numbers into the card's metrics.")
    ap.add_argument("--tmp", type=Path, default=REPO / "runs" / "measure")
    a = ap.parse_args()
    a.tmp.mkdir(parents=True, exist_ok=True)
    res = measure(a.name, a.threads, a.tmp)
    print(json.dumps(res, indent=1))
    (a.tmp / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    if a.write:
        from fer_batch.models import registry

        card_path = Path(registry().get(a.name).card_path)
        raw = yaml.safe_load(card_path.read_text())
        raw.setdefault("metrics", {}).update(res)
        raw["metrics"]["data_dir"] = "../shared/data (research-use datasets, not shipped)"
        tmp = card_path.with_name(card_path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(raw, sort_keys=False, width=110))
        tmp.replace(card_path)


if __name__ == "__main__":
    main()
