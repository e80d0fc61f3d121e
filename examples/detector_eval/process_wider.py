"""The detector check of issue 2 through the real ``fer-batch process`` CLI.

Writes the 244 WIDER FACE val images of ``../shared`` to a temporary folder (JPEG bytes as
shipped), runs ``fer-batch process DIR --det-size 1024`` on them (each image its own
source, every default otherwise), reads the faces Parquet back and scores it against the
ground truth with the same matching as ``evaluate_wider.py`` (valid faces >= 32 px, IoU 0.5;
"strict": every unmatched detection not on an ignored face is a false positive).

    .venv/bin/python examples/detector_eval/process_wider.py [--det-size 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_wider import DATA, evaluate, load_wider  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--det-size", default="1024")
    ap.add_argument("--min-height", type=float, default=32.0)
    args = ap.parse_args()
    if not args.data.exists():
        print(f"{args.data} not found (needs ../shared)", file=sys.stderr)
        return 2
    images, gts = load_wider(args.data, None)
    rows = pq.read_table(args.data, columns=["file", "image"]).to_pylist()
    with tempfile.TemporaryDirectory() as td:
        d = Path(td) / "wider"
        d.mkdir()
        names = []
        for i, r in enumerate(rows):
            name = f"{i:04d}_{Path(r['file']).name}"
            (d / name).write_bytes(r["image"])
            names.append(str(d / name))
        out = Path(td) / "wider.parquet"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "fer_batch.cli", "process", str(d), "--out", str(out), "--det-size", args.det_size,
               "--device", "cpu", "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        faces = pq.read_table(out).to_pandas()
    per_image = []
    for path in names:
        f = faces[faces["source_path"] == path]
        per_image.append({"boxes": f[["x1", "y1", "x2", "y2"]].to_numpy(np.float64), "scores": f["det_score"].to_numpy(np.float64)})
    res = {
        "command": " ".join(["fer-batch", *cmd[3:]]),
        "images": len(names),
        "wall_s": round(wall, 1),
        "strict": evaluate(per_image, gts, args.min_height, thresholds=(0.5,), ignore_small_dets=False),
        "coco_rule": evaluate(per_image, gts, args.min_height, thresholds=(0.5,), ignore_small_dets=True),
    }
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
