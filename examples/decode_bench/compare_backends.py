"""Same results from both decoder backends? Runs ``fer-batch process`` (Python API) with
``--decoder decord`` and ``--decoder pyav`` on each video and compares the rows.

    .venv/bin/python examples/decode_bench/compare_backends.py [videos...] [--fps 2]

Per video: sampled frames (count, largest timestamp distance to the 2 fps grid in frame
periods), faces in the first sampled frame, track ids, and the share of rows (matched by
frame index and track id) whose dominant emotion is equal.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("FER_BATCH_SHARED", "/work/shared/data"))
EMO = ["p_neutral", "p_happy", "p_surprise", "p_sad", "p_angry", "p_disgust", "p_fear"]


def compare(video: Path, fps: float) -> dict:
    from fer_batch.api import run

    out = {}
    for d in ("decord", "pyav"):
        res = run([video], device="cpu", decoder=d, fps=fps)
        out[d] = res
    a, b = out["decord"].faces, out["pyav"].faces
    sa, sb = out["decord"].sources.to_pylist()[0], out["pyav"].sources.to_pylist()[0]
    emo = [c for c in a.column_names if c.startswith("p_")] or EMO

    def keyed(t):
        dom = np.argmax(np.stack([t.column(c).to_numpy() for c in emo], 1), 1) if t.num_rows else np.zeros(0, int)
        return {(int(f), int(k)): int(e) for f, k, e in zip(t.column("frame_index").to_pylist(), t.column("track_id").to_pylist(), dom)}

    ka, kb = keyed(a), keyed(b)
    common = set(ka) & set(kb)
    ts = np.unique(b.column("timestamp_s").to_numpy()) if b.num_rows else np.zeros(0)
    fi = a.column("frame_index").to_numpy() if a.num_rows else np.zeros(0)
    first_a = int((fi == fi.min()).sum()) if len(fi) else 0
    fj = b.column("frame_index").to_numpy() if b.num_rows else np.zeros(0)
    first_b = int((fj == fj.min()).sum()) if len(fj) else 0
    return {
        "video": video.name,
        "frames_decord": sa["frames_sampled"], "frames_pyav": sb["frames_sampled"],
        "rows_decord": a.num_rows, "rows_pyav": b.num_rows,
        "first_frame_faces": [first_a, first_b],
        "tracks_equal": sorted(set(a.column("track_id").to_pylist())) == sorted(set(b.column("track_id").to_pylist())),
        "rows_matched": len(common),
        "dominant_equal": (sum(ka[k] == kb[k] for k in common) / len(common)) if common else 1.0,
        "max_grid_offset_s": float(np.max(np.abs(ts * fps - np.round(ts * fps))) / fps) if len(ts) else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="*", type=Path)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    vids = a.videos or sorted(p for p in (SHARED / "videos").iterdir() if p.suffix.lower() in {".mp4", ".mov", ".mkv", ".avi", ".webm"})
    rows = []
    for v in vids:
        r = compare(v, a.fps)
        rows.append(r)
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
