"""What dlib's face-recognition backbone gives for emotions: a linear probe on its features.

The body of ``DlibFaceNet`` (``--arch dlib_resnet --init dlib_face``, weights from the shipped
``dlib_face_resnet`` card) is frozen; a multinomial logistic regression on its 256-d pooled
features is trained on a FER+ Training subset (majority labels) and scored on FER+ PrivateTest
(FER+'s Test split, majority labels) and on the posed Taiwanese set (faces found by the
project's detector and aligned to the FER framing of the shipped emotion model's card).
FER crops (48x48 gray) are upscaled to ``--size`` and fed as three equal channels.

Reads ``../shared/data`` (research-use data; nothing is copied into the project).
Run: python examples/dlib_transfer/probe.py --n-train 3000 --n-test 1500 --json examples/dlib_transfer/probe.json
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
EMO = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
FERPLUS_TO = {"anger": "angry", "disgust": "disgust", "fear": "fear", "happiness": "happy", "sadness": "sad",
              "surprise": "surprise", "neutral": "neutral"}


def decode_gray(b: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE)


def features(net, gray48: np.ndarray, size: int, bs: int = 32) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(gray48), bs):
            x = np.stack([cv2.resize(g, (size, size), interpolation=cv2.INTER_CUBIC) for g in gray48[i:i + bs]])
            x = torch.from_numpy(np.repeat(x[:, None].astype(np.float32) / 255.0, 3, axis=1))
            out.append(net.features(x).numpy())
    return np.concatenate(out)


def macro_f1(y: np.ndarray, p: np.ndarray, k: int = 7) -> float:
    f = []
    for c in range(k):
        tp = np.sum((p == c) & (y == c))
        fp = np.sum((p == c) & (y != c))
        fn = np.sum((p != c) & (y == c))
        if tp + fn == 0:
            continue
        f.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(f))


def fit_logreg(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 300) -> torch.nn.Linear:
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    lin = torch.nn.Linear(x.shape[1], 7)
    counts = np.bincount(y, minlength=7).astype(np.float32)
    w = torch.from_numpy(np.where(counts > 0, (counts.sum() / np.maximum(counts, 1)) ** 0.5, 0)).float()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt), yt, weight=w) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-test", type=int, default=1500)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from fer_batch.train.nets import DlibFaceNet, dlib_face_state_dict

    net = DlibFaceNet(7, 3, in_mean=0.0, in_std=1.0)
    net.load_state_dict(dlib_face_state_dict(), strict=False)
    net.eval()
    rng = np.random.default_rng(0)
    t = pq.read_table(DATA / "ferplus" / "ferplus.parquet", columns=["image", "fer_usage", "majority"]).to_pandas()
    t = t[t["majority"].notna()]
    t["y"] = [EMO.index(FERPLUS_TO.get(m, m)) for m in t["majority"]]
    tr = t[t["fer_usage"] == "Training"].sample(n=args.n_train, random_state=0)
    te = t[t["fer_usage"] == "PrivateTest"]
    te = te.sample(n=min(args.n_test, len(te)), random_state=0)
    t0 = time.perf_counter()
    f_tr = features(net, np.stack([decode_gray(b) for b in tr["image"]]), args.size)
    f_te = features(net, np.stack([decode_gray(b) for b in te["image"]]), args.size)
    t_feat = time.perf_counter() - t0
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    lin = fit_logreg((f_tr - mu) / sd, tr["y"].to_numpy())
    with torch.no_grad():
        p_te = lin(torch.from_numpy((f_te - mu) / sd).float()).argmax(1).numpy()
        p_tr = lin(torch.from_numpy((f_tr - mu) / sd).float()).argmax(1).numpy()
    res = {
        "n_train": len(tr), "n_test": len(te), "size": args.size,
        "ferplus_train_acc": round(float(np.mean(p_tr == tr["y"].to_numpy())), 4),
        "ferplus_test_acc": round(float(np.mean(p_te == te["y"].to_numpy())), 4),
        "ferplus_test_macro_f1": round(macro_f1(te["y"].to_numpy(), p_te), 4),
        "feature_s": round(t_feat, 1),
    }
    print(json.dumps(res), flush=True)

    # posed set: detect, align to the FER framing of the default emotion card, 48 gray
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
        img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
        canvas, _, _ = frame_for_detection(img)
        r = detect_main_face(det, canvas)
        if r is None:
            no_face += 1
            continue
        c = align_crop(canvas, r[0][None], spec)[0]
        crops.append(cv2.cvtColor(c, cv2.COLOR_BGR2GRAY))
        ys.append(EMO.index(lab))
    f_p = features(net, np.stack(crops), args.size)
    with torch.no_grad():
        p_p = lin(torch.from_numpy((f_p - mu) / sd).float()).argmax(1).numpy()
    ys = np.asarray(ys)
    correct = int(np.sum(p_p == ys))
    res.update({
        "posed_n": len(pt), "posed_no_face": no_face,
        "posed_acc": round(correct / len(pt), 4),  # no face counts as wrong
        "posed_acc_faces_found": round(correct / max(len(ys), 1), 4),
        "posed_macro_f1": round(macro_f1(ys, p_p), 4),
    })
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
