"""The leave-and-return case of issue 14 on a real face, with default options.

Builds a 512x512 clip from ``../shared/data/videos/liveportrait_driving_d0.mp4`` (one man,
25 fps): 3 s of him, 4 s of the empty green screen (his background colour, no face), then
3 s of him again (the clip played backwards, so the poses differ), and runs ``process`` on it
with the defaults (``--reid auto``: the shipped face embedding) and with ``--reid off``.

Run: python examples/track_bench/leave_return_real.py --json examples/track_bench/leave_return_real.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np

SRC = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "videos" / "liveportrait_driving_d0.mp4"


def build(path: Path) -> Path:
    cap = cv2.VideoCapture(str(SRC))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    fps = 25.0
    n = int(3 * fps)
    first = frames[:n]
    second = frames[::-1][:n]
    green = np.median(np.concatenate([f[:40, :40].reshape(-1, 3) for f in frames[:5]]), axis=0).astype(np.uint8)
    empty = np.broadcast_to(green, frames[0].shape).copy()
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames[0].shape[1], frames[0].shape[0]))
    for f in first + [empty] * int(4 * fps) + second:
        w.write(f)
    w.release()
    return path


def summary(table) -> dict:
    t = table.column("timestamp_s").to_numpy()
    tid = table.column("track_id").to_numpy()
    out = {"faces": int(len(tid)), "tracks": int(len(np.unique(tid)))}
    for tr in np.unique(tid):
        tt = t[tid == tr]
        out[f"track_{int(tr)}"] = [round(float(tt.min()), 2), round(float(tt.max()), 2), int(len(tt))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from fer_batch.api import run

    with tempfile.TemporaryDirectory() as td:
        clip = build(Path(td) / "d0_leave_return.mp4")
        res = {"clip": "d0 0-3 s, 4 s empty green screen, d0 backwards 3 s; 512x512, 25 fps, 10 s",
               "reid_auto": summary(run(clip, threads=args.threads).faces),
               "reid_off": summary(run(clip, threads=args.threads, reid="off").faces)}
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
