"""What re-identification costs in ``process``: the same video with ``--reid auto`` and ``off``.

Runs ``fer_batch.api.run`` in-process (one thread) alternately with each setting and reports
wall time, faces, tracks, and how many faces the embedding model ran on and how long it took
(counted by wrapping ``FaceEmbedder.__call__`` in this script only). The share of the wall time
spent embedding, measured inside the same run, is robust to a busy machine; the wall times
are not.

Run: python examples/track_bench/reid_cost.py ../shared/data/bench/t1_720p30_60s.mp4 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("video", type=Path)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np

    from fer_batch import embed as E
    from fer_batch.api import run

    stats = {"faces": 0, "s": 0.0}
    orig = E.FaceEmbedder.__call__

    def counted(self, image, kps):
        t = time.perf_counter()
        out = orig(self, image, kps)
        stats["s"] += time.perf_counter() - t
        stats["faces"] += len(kps)
        return out

    E.FaceEmbedder.__call__ = counted
    runs = []
    for _ in range(args.repeat):
        for mode in ("off", "auto"):
            stats.update(faces=0, s=0.0)
            t = time.perf_counter()
            res = run(args.video, threads=args.threads, reid=mode)
            wall = time.perf_counter() - t
            tid = res.faces.column("track_id").to_numpy()
            runs.append({"reid": mode, "wall_s": round(wall, 2), "faces": len(tid), "tracks": int(len(np.unique(tid))),
                         "faces_embedded": stats["faces"], "embed_s": round(stats["s"], 2),
                         "embed_share_of_wall": round(stats["s"] / wall, 4)})
            print(json.dumps(runs[-1]), flush=True)
    out = {"video": str(args.video), "threads": args.threads, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
