"""Cost of --source-timeout (the local runner's worker process) against in-process runs.

Runs ``fer-batch process`` on the same inputs with ``--source-timeout off`` (in-process, no
limit) and the default ``auto`` (units in a worker process), alternating the order round by
round so a busy machine disturbs both alike, and reports median wall seconds, their ratio, and
the peak of the summed resident memory of the run's processes (sampled every 0.1 s from /proc).

    python examples/timeout_cost/measure.py VIDEO [MORE INPUTS] --rounds 5 [--json out.json]

With no inputs given it uses ../shared/data/bench/t1_720p30_60s.mp4 and a folder of 40
generated photos (many small sources: the per-source cost of the pipe).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fer_batch.bench import tree_rss_mb

REPO = Path(__file__).resolve().parents[2]


def run_once(inputs: list[str], mode: str, extra: list[str]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "fer_batch.cli", "process", *inputs, "--out", f"{d}/r.parquet", "--quiet",
               "--source-timeout", mode, *extra]  # fmt: skip
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peak = 0.0
        while p.poll() is None:
            peak = max(peak, tree_rss_mb(p.pid))
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        err = p.stderr.read().decode()
        if p.returncode not in (0, 1):
            raise RuntimeError(f"{cmd} exited {p.returncode}: {err[-2000:]}")
    return wall, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more process options")
    a = ap.parse_args()
    sets: dict[str, list[str]] = {}
    tmp = None
    if a.inputs:
        sets["given"] = a.inputs
    else:
        video = REPO.parent / "shared" / "data" / "bench" / "t1_720p30_60s.mp4"
        if video.exists():
            sets["60 s 720p video"] = [str(video)]
        from fer_batch import synth

        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name) / "photos"
        for k in range(4):
            synth.make_image_folder(folder / f"set{k}", scale=0.5)
        sets["44 photos"] = [str(folder)]
    extra = [x for x in a.extra if x != "--"]
    results = {}
    for name, inputs in sets.items():
        walls: dict[str, list[float]] = {"off": [], "auto": []}
        peaks: dict[str, list[float]] = {"off": [], "auto": []}
        ratios = []
        for r in range(a.rounds):
            order = ("off", "auto") if r % 2 == 0 else ("auto", "off")
            got = {}
            for mode in order:
                got[mode] = run_once(inputs, mode, extra)
                walls[mode].append(got[mode][0])
                peaks[mode].append(got[mode][1])
            ratios.append(got["auto"][0] / got["off"][0])
            print(f"{name} round {r + 1}: off {got['off'][0]:.2f} s, auto {got['auto'][0]:.2f} s, "
                  f"ratio {ratios[-1]:.3f}; peak RSS off {got['off'][1]:.0f} MB, auto {got['auto'][1]:.0f} MB", flush=True)
        res = {
            "rounds": a.rounds,
            "wall_off_s": statistics.median(walls["off"]), "wall_auto_s": statistics.median(walls["auto"]),
            "ratio_auto_to_off": statistics.median(ratios), "ratios": ratios,
            "peak_rss_mb_off": statistics.median(peaks["off"]), "peak_rss_mb_auto": statistics.median(peaks["auto"]),
        }  # fmt: skip
        results[name] = res
        print(f"{name}: median wall off {res['wall_off_s']:.2f} s, auto {res['wall_auto_s']:.2f} s, "
              f"median ratio {res['ratio_auto_to_off']:.3f}; peak RSS (all processes) off "
              f"{res['peak_rss_mb_off']:.0f} MB, auto {res['peak_rss_mb_auto']:.0f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
