"""Estimate the 5-point alignment template that makes pipeline crops look like FER2013 crops.

FER2013 faces are 48x48 gray crops with a fixed, loose framing. To make the video pipeline's
aligned crops match it, the project's own face detector is run on FER2013 training images
(upscaled, with a replicated border for context, as ``fer-batch evaluate --detect`` does) and
the landmarks are mapped back to 48x48 coordinates; the template is their per-coordinate
median (robust to the few wrong detections). Written into a card as
``preprocess.align_template``. Run::

    python -m fer_batch.train.template ../shared/data/fer2013/fer2013_train.parquet --n 3000
"""

from __future__ import annotations

import argparse
import json
import logging

import cv2
import numpy as np

from fer_batch.config import DetectConfig
from fer_batch.types import Frame

log = logging.getLogger(__name__)

# Upscaling and border used for small face crops before detection: the detector's smallest
# anchors want faces of >= ~16 px, and a face touching the image edge is often missed.
UPSCALE = 4
BORDER = 0.25  # fraction of the (upscaled) side added on each side, replicated


def frame_for_detection(img: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A small face crop -> (BGR canvas, scale, offset): canvas = crop * scale + offset."""
    if img.ndim == 2 or img.shape[-1] == 1:
        img = cv2.cvtColor(img.reshape(img.shape[0], img.shape[1]), cv2.COLOR_GRAY2BGR)
    scale = float(UPSCALE) if max(img.shape[:2]) < 160 else 1.0
    up = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC) if scale != 1 else img
    b = int(round(BORDER * max(up.shape[:2])))
    canvas = cv2.copyMakeBorder(up, b, b, b, b, cv2.BORDER_REPLICATE)
    return canvas, scale, float(b)


def detect_main_face(detector, canvas: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(5, 2) landmarks and score of the largest, most central face, or None."""
    fd = detector(Frame(0, 0.0, canvas))
    if len(fd) == 0:
        return None
    i = int(detector._largest_central(np.c_[fd.xyxy, fd.det_score], canvas.shape)[0])
    return fd.kps[i], float(fd.det_score[i])


def estimate(images: np.ndarray, detector, n: int = 3000, seed: int = 0) -> dict:
    """Median landmarks (48x48 coordinates for 48x48 images) over ``n`` random images."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), size=min(n, len(images)), replace=False)
    pts, scores = [], []
    for i in idx:
        canvas, scale, off = frame_for_detection(images[i])
        r = detect_main_face(detector, canvas)
        if r is None:
            continue
        k, s = r
        pts.append((k - off) / scale)
        scores.append(s)
    pts = np.asarray(pts)
    med = np.median(pts, axis=0)
    mad = np.median(np.abs(pts - med), axis=0)
    side = images.shape[1]
    return {"size": int(side), "points": np.round(med, 3).tolist(), "n_images": int(len(idx)), "n_detected": int(len(pts)),
            "mad": np.round(mad, 3).tolist(), "median_score": float(np.median(scores)) if scores else 0.0}


def main(argv: list[str] | None = None) -> None:
    from fer_batch.detect import FaceDetector
    from fer_batch.train.data import load_dataset

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--det-size", type=int, default=320)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    ds = load_dataset(a.data, 48, "gray")
    det = FaceDetector(DetectConfig(det_size=a.det_size, det_thresh=0.5, min_face=0), threads=a.threads)
    det.setup()
    print(json.dumps(estimate(ds.images, det, a.n, a.seed)))


if __name__ == "__main__":
    main()
