"""``fer-batch evaluate``: metrics of a registered model, an ONNX file with its card, or a checkpoint.

Plain mode feeds the dataset's images as face crops through the card's preprocessing (exactly
what the pipeline does after alignment). ``detect`` mode treats every image as a photo: the
project's face detector finds the main face, the crop is aligned with the card's template by
the pipeline's own code (``EmotionClassifier.crops``), and an image without a face counts as
wrong.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fer_batch.config import ClassifyConfig, DetectConfig
from fer_batch.errors import DataError
from fer_batch.train.data import ImageDataset, load_dataset
from fer_batch.train.engine import metrics_from
from fer_batch.types import EMOTIONS

log = logging.getLogger(__name__)


class CheckpointClassifier:
    """A training checkpoint behind the ``EmotionClassifier`` calls used here (torch, CPU)."""

    def __init__(self, path: str, tta: bool | None, batch_size: int = 256):
        from fer_batch.train.engine import load_checkpoint, model_from_checkpoint

        self.model, self.spec, labels = model_from_checkpoint(load_checkpoint(path))
        from fer_batch.models import canonical_label

        self.order = np.array([EMOTIONS.index(canonical_label(lbl)) for lbl in labels])
        self.tta = bool(tta) if tta is not None else False
        self.batch_size = batch_size
        self.info = {"name": Path(path).name, "file": str(path), "provider": "torch-cpu", "tta": self.tta}

    def crops(self, image_bgr, kps):
        from fer_batch.preprocess import align_crop

        return align_crop(image_bgr, kps, self.spec)

    def __call__(self, crops):
        from fer_batch.train.engine import predict

        p = predict(self.model, np.asarray(crops), self.spec, self.batch_size, self.tta)
        out = np.zeros_like(p)
        out[:, self.order] = p
        return out

    def setup(self):
        pass


def open_classifier(model: str, tta: bool | None, batch_size: int, threads: int, device: str, models_dir: str | None):
    if str(model).endswith(".pt"):
        return CheckpointClassifier(model, tta, batch_size)
    from fer_batch.classify import EmotionClassifier

    c = EmotionClassifier(ClassifyConfig(model=model, batch_size=batch_size, device=device, tta=tta), threads=threads, models_dir=models_dir)
    c.setup()
    return c


def _colour_for(clf) -> str:
    return "gray" if clf.spec.colour == "gray" else "bgr"


def run(model: str, data: str, tta: bool | None = None, detect: bool = False, exclude_dups_of: str | None = None,
        batch_size: int = 256, threads: int = 0, device: str = "cpu", models_dir: str | None = None,
        drop_unknown: bool = False, limit: int = 0, det_size: int = 320, every: int = 1) -> dict[str, Any]:
    """Evaluate; returns the metrics dict (also the model info, data, timing)."""
    clf = open_classifier(model, tta, batch_size, threads, device, models_dir)
    size = 0 if detect else clf.spec.size
    ds = load_dataset(data, size, "bgr" if detect else _colour_for(clf), drop_unknown)
    excluded = 0
    if exclude_dups_of:
        ref = load_dataset(exclude_dups_of, 48, "gray", drop_unknown=True)
        dup = np.isin(ds.keys.astype(str), ref.keys.astype(str))
        excluded = int(dup.sum())
        ds = ds.subset(np.flatnonzero(~dup))
    if every > 1:
        ds = ds.subset(np.arange(0, len(ds), every))
    if limit:
        ds = ds.subset(np.arange(min(limit, len(ds))))
    if len(ds) == 0:
        raise DataError(f"{data}: no images to evaluate")
    t0 = time.time()
    if detect:
        pred = _predict_detect(clf, ds, threads, det_size)
    else:
        probs = clf(ds.images)
        pred = probs.argmax(1)
    dt = time.time() - t0
    m = metrics_from(ds.labels, pred)
    m.update({"model": clf.info, "data": str(data), "tta": clf.info.get("tta"), "detect": detect,
              "excluded_duplicates": excluded, "seconds": round(dt, 2), "images_per_s": round(len(ds) / max(dt, 1e-9), 1),
              "corrupt_skipped": len(ds.report.corrupt)})
    return m


def _predict_detect(clf, ds: ImageDataset, threads: int, det_size: int) -> np.ndarray:
    from fer_batch.detect import FaceDetector
    from fer_batch.train.template import detect_main_face, frame_for_detection

    det = FaceDetector(DetectConfig(det_size=det_size, det_thresh=0.5, min_face=0), threads=threads)
    det.setup()
    crops, where = [], []
    for i, img in enumerate(ds.images):
        canvas, _, _ = frame_for_detection(np.asarray(img))
        r = detect_main_face(det, canvas)
        if r is None:
            continue
        crops.append(clf.crops(canvas, r[0][None])[0])
        where.append(i)
    pred = np.full(len(ds), -1, np.int64)
    if crops:
        pred[np.asarray(where)] = clf(np.stack(crops)).argmax(1)
    log.info("detect: %d of %d images had a face", len(where), len(ds))
    return pred


def confusion_png(cm: list[list[int]], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG (OpenCV drawing; counts and row %)."""
    cm = np.asarray(cm, np.float64)
    k = cm.shape[0]
    cell, left, top = 70, 90, 60
    img = np.full((top + k * cell + 40, left + k * cell + 10, 3), 255, np.uint8)
    rown = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    for i in range(k):
        for j in range(k):
            v = rown[i, j]
            col = (int(255 - 200 * v), int(255 - 120 * v), int(255 - 30 * v))
            x0, y0 = left + j * cell, top + i * cell
            cv2.rectangle(img, (x0, y0), (x0 + cell - 2, y0 + cell - 2), col, -1)
            ink = (255, 255, 255) if v > 0.6 else (0, 0, 0)
            cv2.putText(img, f"{int(cm[i, j])}", (x0 + 6, y0 + 28), cv2.FONT_HERSHEY_SIMPLEX, 0.5, ink, 1, cv2.LINE_AA)
            cv2.putText(img, f"{100 * v:.0f}%", (x0 + 6, y0 + 52), cv2.FONT_HERSHEY_SIMPLEX, 0.45, ink, 1, cv2.LINE_AA)
        cv2.putText(img, EMOTIONS[i][:8], (4, top + i * cell + 40), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, EMOTIONS[i][:7], (left + i * cell + 4, top - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, (title or "confusion (rows: true, columns: predicted)")[:80], (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"cannot write {path}")


def format_report(m: dict[str, Any]) -> str:
    lines = [f"accuracy: {m['accuracy']:.4f}", f"macro_f1: {m['macro_f1']:.4f}",
             f"n: {m['n']}  tta: {m.get('tta')}  detect: {m.get('detect')}  no_face: {m.get('no_prediction', 0)}  excluded_duplicates: {m.get('excluded_duplicates', 0)}",
             "", f"{'class':10s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'support':>8s}"]
    for name, r in m["per_class"].items():
        lines.append(f"{name:10s} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:6.3f} {r['support']:8d}")
    lines += ["", "confusion (rows true, cols predicted: " + " ".join(e[:3] for e in EMOTIONS) + ")"]
    lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in m["confusion"]]
    return "\n".join(lines)


def write_outputs(m: dict[str, Any], json_path: Path | None, png_path: Path | None) -> None:
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(m, indent=2, default=str))
    if png_path:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        confusion_png(m["confusion"], png_path, f"{m['model'].get('name')}  acc {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}")
