"""Score a ``fer-batch train --arch dlib_resnet --init dlib_face`` checkpoint on the sets of probe.py.

FER+ PrivateTest (majority labels; the same ``--n-test`` sample as probe.py) and the posed
Taiwanese set (detected, aligned to the default emotion card's FER framing, gray), both fed
through the checkpoint's own preprocessing (``fer_batch.preprocess.prepare``).

Run: python examples/dlib_transfer/eval_checkpoint.py RUN/best.pt --n-test 1500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe import DATA, EMO, FERPLUS_TO, decode_gray, macro_f1  # noqa: E402


def posed_crops() -> tuple[np.ndarray, np.ndarray, int]:
    from fer_batch.config import DetectConfig
    from fer_batch.detect import FaceDetector
    from fer_batch.models import registry
    from fer_batch.preprocess import PreprocessSpec, align_crop
    from fer_batch.train.template import detect_main_face, frame_for_detection

    det = FaceDetector(DetectConfig(), device="cpu", threads=1)
    det.setup()
    spec = PreprocessSpec.from_card(registry().default("emotion_classification"))
    pt = pq.read_table(DATA / "posed_taiwanese" / "taiwanese_posed.parquet", columns=["image", "label"]).to_pandas()
    crops, ys, no_face = [], [], 0
    for b, lab in zip(pt["image"], pt["label"]):
        canvas, _, _ = frame_for_detection(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR))
        r = detect_main_face(det, canvas)
        if r is None:
            no_face += 1
            continue
        crops.append(cv2.cvtColor(align_crop(canvas, r[0][None], spec)[0], cv2.COLOR_BGR2GRAY))
        ys.append(EMO.index(lab))
    return np.stack(crops), np.asarray(ys), no_face


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--n-test", type=int, default=1500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from fer_batch.preprocess import PreprocessSpec, prepare
    from fer_batch.train.models import build_model

    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    targs = json.loads(ck["args"])
    spec = PreprocessSpec.from_dict(json.loads(ck["preprocess"]))
    model = build_model(targs["arch"], len(ck["labels"]), spec.channels)
    model.load_state_dict(ck["model"])
    model.eval()
    order = [EMO.index(lbl) for lbl in ck["labels"]]

    def predict(gray48: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(gray48), 32):
                x = torch.from_numpy(prepare(gray48[i:i + 32][..., None], spec))
                out.append(np.asarray(order)[model(x).argmax(1).numpy()])
        return np.concatenate(out)

    t = pq.read_table(DATA / "ferplus" / "ferplus.parquet", columns=["image", "fer_usage", "majority"]).to_pandas()
    t = t[t["majority"].notna()]
    te = t[t["fer_usage"] == "PrivateTest"]
    te = te.sample(n=min(args.n_test, len(te)), random_state=0)
    y = np.asarray([EMO.index(FERPLUS_TO.get(m, m)) for m in te["majority"]])
    p = predict(np.stack([decode_gray(b) for b in te["image"]]))
    res = {"checkpoint": str(args.checkpoint), "epoch": ck["epoch"], "n_test": len(te),
           "ferplus_test_acc": round(float(np.mean(p == y)), 4), "ferplus_test_macro_f1": round(macro_f1(y, p), 4)}
    print(json.dumps(res), flush=True)
    crops, ys, no_face = posed_crops()
    pp = predict(crops)
    res.update({"posed_n": len(ys) + no_face, "posed_no_face": no_face,
                "posed_acc": round(float(np.sum(pp == ys)) / (len(ys) + no_face), 4), "posed_macro_f1": round(macro_f1(ys, pp), 4)})
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
