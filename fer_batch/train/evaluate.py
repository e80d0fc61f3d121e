"""``fer-batch evaluate``: metrics of a registered model, an ONNX file with its card, or a checkpoint.

Vote data (one vote column per emotion, e.g. FER+): the label for accuracy is the majority
(see :mod:`fer_batch.train.data`); rows without one are left out of the accuracy and counted
(``no_majority``). ``nll`` and ``ece`` measure agreement with the annotators' distribution on
the same rows (``nll_all`` / ``ece_all``: on every row with votes); see
:func:`fer_batch.train.engine.vote_metrics`.

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
from fer_batch.train.engine import metrics_from, vote_metrics
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


def open_classifier(model: str, tta: bool | None, batch_size: int, threads: int, device: str, models_dir: str | None,
                    calibrated: bool = True):
    if str(model).endswith(".pt"):
        return CheckpointClassifier(model, tta, batch_size)
    from fer_batch.classify import EmotionClassifier

    c = EmotionClassifier(ClassifyConfig(model=model, batch_size=batch_size, device=device, tta=tta), threads=threads, models_dir=models_dir,
                          calibrated=calibrated)
    c.setup()
    return c


def _colour_for(clf) -> str:
    return "gray" if clf.spec.colour == "gray" else "bgr"


def run(model: str, data: str, tta: bool | None = None, detect: bool = False, exclude_dups_of: str | None = None,
        batch_size: int = 256, threads: int = 0, device: str = "cpu", models_dir: str | None = None,
        drop_unknown: bool = False, limit: int = 0, det_size: int = 320, every: int = 1, where: str | None = None,
        predictions: str | Path | None = None, calibrated: bool = True) -> dict[str, Any]:
    """Evaluate; returns the metrics dict (also the model info, data, timing).

    ``calibrated`` False ignores the card's temperature (to measure calibration itself).
    """
    clf = open_classifier(model, tta, batch_size, threads, device, models_dir, calibrated)
    size = 0 if detect else clf.spec.size
    ds = load_dataset(data, size, "bgr" if detect else _colour_for(clf), drop_unknown, where=where)
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
        probs = _predict_detect(clf, ds, threads, det_size)
    else:
        probs = clf(ds.images)
    pred = np.where(np.isnan(probs).any(1), -1, np.nan_to_num(probs).argmax(1))
    dt = time.time() - t0
    lab = ds.labels >= 0
    m = metrics_from(ds.labels[lab], pred[lab])
    m["no_majority"] = int((~lab).sum())
    if ds.targets is not None:
        have = ~np.isnan(probs).any(1)
        v = vote_metrics(probs[lab & have], ds.targets[lab & have])
        va = vote_metrics(probs[have], ds.targets[have])
        m.update({"nll": v["nll"], "ece": v["ece"], "reliability": v["reliability"], "nll_all": va["nll"], "ece_all": va["ece"],
                  "n_votes": int((lab & have).sum()), "n_votes_all": int(have.sum())})
    if predictions:
        write_predictions(Path(predictions), ds, probs)
    m.update({"model": clf.info, "data": str(data), "where": where, "tta": clf.info.get("tta"), "detect": detect,
              "temperature": clf.info.get("temperature", 1.0),
              "excluded_duplicates": excluded, "seconds": round(dt, 2), "images_per_s": round(len(ds) / max(dt, 1e-9), 1),
              "corrupt_skipped": len(ds.report.corrupt)})
    return m


def write_predictions(path: Path, ds: ImageDataset, probs: np.ndarray) -> None:
    """One row per evaluated image in the data's order: ``row`` (its row in DATA), ``label``, ``p_<emotion>``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"row": pa.array(ds.rows if ds.rows is not None else np.arange(len(ds)), pa.int64()),
            "label": pa.array([EMOTIONS[i] if i >= 0 else None for i in ds.labels], pa.string())}
    for j, e in enumerate(EMOTIONS):
        cols[f"p_{e}"] = pa.array(probs[:, j], pa.float32())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(cols), tmp)
    tmp.replace(path)


def reliability_png(rel: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Reliability diagram: mean top probability vs mean annotator agreement per bin (bar width ~ count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfect agreement")
    pts = [r for r in rel if r["n"]]
    total = sum(r["n"] for r in pts) or 1
    for r in pts:
        ax.bar(r["bin"] + 1 / 30, r["agreement"], width=1 / 15 * 0.9, color="#4c78a8", alpha=0.3 + 0.7 * min(1.0, 5 * r["n"] / total))
    ax.plot([r["confidence"] for r in pts], [r["agreement"] for r in pts], "o-", color="#e45756", label="mean per bin")
    ax.set_xlabel("model's top probability")
    ax.set_ylabel("share of annotators choosing that emotion")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(title[:70], fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    probs = np.full((len(ds), len(EMOTIONS)), np.nan, np.float32)
    if crops:
        probs[np.asarray(where)] = clf(np.stack(crops))
    log.info("detect: %d of %d images had a face", len(where), len(ds))
    return probs


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
    lines = [f"accuracy: {m['accuracy']:.4f}", f"macro_f1: {m['macro_f1']:.4f}"]
    if "nll" in m:
        lines += [f"nll: {m['nll']:.4f}", f"ece: {m['ece']:.4f}",
                  f"(vote agreement on the {m['n_votes']} majority rows; on all {m['n_votes_all']} rows with votes: nll {m['nll_all']:.4f}, ece {m['ece_all']:.4f})"]
    lines += [f"n: {m['n']}  tta: {m.get('tta')}  detect: {m.get('detect')}  no_face: {m.get('no_prediction', 0)}  "
              f"no_majority: {m.get('no_majority', 0)}  excluded_duplicates: {m.get('excluded_duplicates', 0)}  temperature: {m.get('temperature', 1.0)}",
              "", f"{'class':10s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'support':>8s}"]
    for name, r in m["per_class"].items():
        lines.append(f"{name:10s} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:6.3f} {r['support']:8d}")
    lines += ["", "confusion (rows true, cols predicted: " + " ".join(e[:3] for e in EMOTIONS) + ")"]
    lines += ["  " + " ".join(f"{v:5d}" for v in row) for row in m["confusion"]]
    return "\n".join(lines)


def write_outputs(m: dict[str, Any], json_path: Path | None, png_path: Path | None) -> None:
    """JSON of every metric; the confusion matrix PNG and, for vote data, a reliability diagram beside it."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(m, indent=2, default=str))
    if png_path:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        confusion_png(m["confusion"], png_path, f"{m['model'].get('name')}  acc {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}")
        if m.get("reliability"):
            rp = png_path.with_name(png_path.name.replace(".confusion", "") .removesuffix(".png") + ".reliability.png")
            reliability_png(m["reliability"], rp, f"{m['model'].get('name')}  ece {m['ece']:.4f}  nll {m['nll']:.4f}")
