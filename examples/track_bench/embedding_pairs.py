"""Same-person / different-person distances of the shipped face embedding on real faces.

Reads ``../shared/data`` (research-use media, never copied into the project):
  * same person: pairs of frames (the largest face) of one single-person video;
  * different people: pairs across videos (one person each, listed in ``VIDEOS``), and pairs of
    faces within one group photo (``PHOTOS``).
For each pair it computes the Euclidean distance of the raw 128-d embeddings (dlib's
convention, threshold 0.6) and the cosine similarity of the L2-normalised ones (what the
tracker uses), chooses the threshold that puts most pairs on the right side (both classes
weighted equally), and reports the share of pairs on the right side of it.

It also measures the alignment (RetinaFace's 5 points -> dlib's chip template): the residual of
the 5 points after the similarity fit, in chip pixels, and the pair accuracy when the template
is scaled or shifted (so the chosen mapping is compared with its neighbours, not assumed), and
the parity of the ONNX model with the numpy reference forward pass on these real chips.

Run: python examples/track_bench/embedding_pairs.py --out examples/track_bench/embedding_pairs.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import cv2
import numpy as np

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
VIDEOS = [  # one person each (media_manifest.json); the hamilton clip (several people) and
    # face_noface (cut to animation) are left out.
    "pyfeat_single_face.mp4", "pyfeat_wolfganglanger_pexels.mp4",
    "liveportrait_driving_d0.mp4", "liveportrait_driving_d10.mp4", "liveportrait_driving_d11.mp4",
    "liveportrait_driving_d12.mp4", "liveportrait_driving_d14.mp4", "liveportrait_driving_d18.mp4",
    "liveportrait_driving_d19.mp4", "liveportrait_driving_d20.mp4", "liveportrait_source_s13.mp4",
    "liveportrait_source_s18.mp4", "liveportrait_source_s20.mp4", "liveportrait_source_s29.mp4",
    "liveportrait_source_s32.mp4",
]
PHOTOS = ["insightface_t1.jpg", "facenet_multiface.jpg", "facerec_two_people.jpg",
          "facerec_obama_and_biden.jpg", "pyfeat_multi_face.jpg"]


def frames(path: Path, n: int):
    cap = cv2.VideoCapture(str(path))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    want = set(np.linspace(0, total - 1, n).round().astype(int).tolist())
    i = 0
    while True:
        ok, f = cap.read()
        if not ok:
            break
        if i in want:
            yield i, f
        i += 1
    cap.release()


def best_threshold(same: np.ndarray, diff: np.ndarray, lower_is_same: bool) -> tuple[float, float, float]:
    """Threshold maximising the mean of the two per-class accuracies; (thr, acc_same, acc_diff)."""
    cands = np.unique(np.concatenate([same, diff]))
    mids = (cands[:-1] + cands[1:]) / 2 if len(cands) > 1 else cands
    best = (0.0, 0.0, 0.0, -1.0)
    for t in mids:
        a_s = float(np.mean(same < t)) if lower_is_same else float(np.mean(same > t))
        a_d = float(np.mean(diff >= t)) if lower_is_same else float(np.mean(diff <= t))
        if (a_s + a_d) / 2 > best[3]:
            best = (float(t), a_s, a_d, (a_s + a_d) / 2)
    return best[:3]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=12, help="frames per video")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--save-chips", type=Path, default=None, help="npz of the chips and raw embeddings (parity checks)")
    args = ap.parse_args()

    from fer_batch.config import DetectConfig
    from fer_batch.detect import FaceDetector
    from fer_batch.embed import FaceEmbedder
    from fer_batch.preprocess import PreprocessSpec, _umeyama, align_crop
    from fer_batch.types import Frame

    det = FaceDetector(DetectConfig(), device="cpu", threads=1)
    det.setup()
    emb = FaceEmbedder(device="cpu", threads=1).setup()
    spec = emb.spec
    tpl = spec.template.astype(np.float64)

    faces = []  # dicts: group (identity key), image, kps
    for v in VIDEOS:
        for i, f in frames(DATA / "videos" / v, args.frames):
            dets = det(Frame(image=f, index=i, timestamp_s=0.0))
            if len(dets) == 0:
                continue
            area = np.prod(dets.xyxy[:, 2:] - dets.xyxy[:, :2], axis=1)
            j = int(np.argmax(area))
            faces.append({"id": v, "src": v, "image": f, "kps": dets.kps[j]})
    for p in PHOTOS:
        img = cv2.imread(str(DATA / "photos" / p))
        dets = det(Frame(image=img, index=0, timestamp_s=0.0))
        for j in range(len(dets)):
            w = dets.xyxy[j, 2] - dets.xyxy[j, 0]
            if w < 40:  # too small to be a fair identity sample
                continue
            faces.append({"id": f"{p}#{j}", "src": p, "image": img, "kps": dets.kps[j]})
    ids = [f["id"] for f in faces]
    srcs = [f["src"] for f in faces]
    print(f"{len(faces)} faces: {len(set(ids))} identities")

    # pairs: same = same video; different = different videos, or two faces of one photo.
    same_idx, diff_idx = [], []
    for a, b in itertools.combinations(range(len(faces)), 2):
        if ids[a] == ids[b]:
            same_idx.append((a, b))
        elif (srcs[a] in VIDEOS and srcs[b] in VIDEOS) or (srcs[a] == srcs[b]):
            diff_idx.append((a, b))
    same_idx, diff_idx = np.array(same_idx), np.array(diff_idx)

    def evaluate(template: np.ndarray) -> dict:
        sp = PreprocessSpec(spec.size, None, spec.colour, spec.mean, spec.std, False, template.astype(np.float32), spec.size)
        chips = np.concatenate([align_crop(f["image"], f["kps"][None], sp) for f in faces])
        raw = emb.embed_chips(chips, normalise=False)
        unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        d_same = np.linalg.norm(raw[same_idx[:, 0]] - raw[same_idx[:, 1]], axis=1)
        d_diff = np.linalg.norm(raw[diff_idx[:, 0]] - raw[diff_idx[:, 1]], axis=1)
        c_same = np.sum(unit[same_idx[:, 0]] * unit[same_idx[:, 1]], axis=1)
        c_diff = np.sum(unit[diff_idx[:, 0]] * unit[diff_idx[:, 1]], axis=1)
        t, a_s, a_d = best_threshold(d_same, d_diff, True)
        tc, ac_s, ac_d = best_threshold(c_same, c_diff, False)
        n = len(d_same) + len(d_diff)
        return {
            "chips": chips, "raw": raw, "d_same": d_same, "d_diff": d_diff, "c_same": c_same, "c_diff": c_diff,
            "summary": {
                "euclid_threshold": round(t, 4), "euclid_same_ok": round(a_s, 4), "euclid_diff_ok": round(a_d, 4),
                "euclid_all_ok": round(float((a_s * len(d_same) + a_d * len(d_diff)) / n), 4),
                "at_0.6_same_ok": round(float(np.mean(d_same < 0.6)), 4), "at_0.6_diff_ok": round(float(np.mean(d_diff >= 0.6)), 4),
                "cosine_threshold": round(tc, 4), "cosine_same_ok": round(ac_s, 4), "cosine_diff_ok": round(ac_d, 4),
                "cosine_all_ok": round(float((ac_s * len(c_same) + ac_d * len(c_diff)) / n), 4),
                "same_dist_p50_p95_max": [round(float(np.percentile(d_same, q)), 4) for q in (50, 95, 100)],
                "diff_dist_min_p05_p50": [round(float(np.percentile(d_diff, q)), 4) for q in (0, 5, 50)],
                "same_cos_min_p05": [round(float(np.percentile(c_same, q)), 4) for q in (0, 5)],
                "diff_cos_p95_max": [round(float(np.percentile(c_diff, q)), 4) for q in (95, 100)],
            },
        }

    t0 = time.perf_counter()
    base = evaluate(tpl)
    print("nominal", json.dumps(base["summary"]))
    # residual of the 5 points after the similarity fit, in chip pixels
    res = []
    for f in faces:
        m = _umeyama(f["kps"].astype(np.float64), tpl).astype(np.float64)
        mapped = f["kps"] @ m[:, :2].T + m[:, 2]
        res.append(np.linalg.norm(mapped - tpl, axis=1))
    res = np.array(res)
    hard_diff = np.argsort(base["d_diff"])[:8]
    hard_same = np.argsort(-base["d_same"])[:5]
    hardest = {
        "closest_different": [[srcs[diff_idx[k, 0]], srcs[diff_idx[k, 1]], round(float(base["d_diff"][k]), 4)] for k in hard_diff],
        "farthest_same": [[srcs[same_idx[k, 0]], round(float(base["d_same"][k]), 4)] for k in hard_same],
    }
    centre = tpl.mean(0)
    variants = {}
    for label, t in {
        "scale_0.90": centre + (tpl - centre) * 0.90, "scale_0.95": centre + (tpl - centre) * 0.95,
        "scale_1.05": centre + (tpl - centre) * 1.05, "scale_1.10": centre + (tpl - centre) * 1.10,
        "shift_up_4px": tpl - [0, 4], "shift_down_4px": tpl + [0, 4],
        "eyes_only_mouth_up_4px": np.vstack([tpl[:3], tpl[3:] - [0, 4]]),
    }.items():
        variants[label] = evaluate(np.asarray(t))["summary"]
        print(label, json.dumps(variants[label]))
    out = {
        "faces": len(faces), "identities": len(set(ids)), "same_pairs": int(len(same_idx)), "different_pairs": int(len(diff_idx)),
        "frames_per_video": args.frames, "videos": VIDEOS, "photos": PHOTOS,
        "nominal": base["summary"],
        "alignment_residual_px": {"mean": round(float(res.mean()), 3), "per_point_mean": [round(float(x), 3) for x in res.mean(0)],
                                   "p95": round(float(np.percentile(res, 95)), 3)},
        "template_variants": variants,
        "hardest_pairs": hardest,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.save_chips:
        np.savez_compressed(args.save_chips, chips=base["chips"], raw=base["raw"])
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("videos", "photos", "template_variants")}, indent=1))


if __name__ == "__main__":
    main()
