"""Throughput benchmark of ``fer-batch process`` against decode-only, in one run.

For each video: (1) decord's sequential decode-only throughput of the same file (the
ceiling), (2) a full ``process`` run, (3) a run of only the first few seconds. The
steady-state real-time factor (video seconds per wall second, start-up excluded) is
``(duration_full - duration_short) / (wall_full - wall_short)``. Each run is a separate
process so its peak RSS is measured on its own (``os.wait4``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq


@dataclass
class BenchResult:
    video: str
    duration_s: float
    native_fps: float
    decode_fps: float  # frames decoded per wall second, sequential, decode only
    decode_rtf: float  # video seconds per wall second, decode only (the ceiling)
    wall_full_s: float
    wall_short_s: float
    rtf_steady: float  # video seconds per wall second, start-up excluded
    ratio_to_decode: float  # rtf_steady / decode_rtf (target >= 0.8)
    sampled_fps: float  # sampled frames per wall second (steady)
    faces_per_s: float  # faces classified per wall second (steady)
    faces_per_frame: float
    faces_first_frame: int
    peak_rss_mb_full: float
    peak_rss_mb_short: float
    peak_rss_mb_decode: float


def _run_child(args: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run a child python; return (wall seconds, peak RSS MB, stdout).

    ``os.wait4`` gives this child's own rusage (peak RSS), unlike RUSAGE_CHILDREN; stderr goes
    to a temporary file so a chatty child cannot block on a full pipe.
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        stdout = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(args)} exited {p.returncode}: {err.read()[-2000:]}")
    return wall, ru.ru_maxrss / 1024.0, stdout


_DECODE_ONLY = r"""
import sys, time, json, decord
vr = decord.VideoReader(sys.argv[1], num_threads=int(sys.argv[2]))
n = len(vr); t0 = time.perf_counter()
for i in range(n):
    vr.next()
dt = time.perf_counter() - t0
print(json.dumps({"frames": n, "seconds": dt, "fps": vr.get_avg_fps()}))
"""


def bench_video(video: Path, fps: float = 2.0, short_s: float = 5.0, threads: int = 0, extra: list[str] | None = None) -> BenchResult:
    import decord

    vr = decord.VideoReader(str(video))
    n = len(vr)
    ts = vr.get_frame_timestamp(n - 1)
    duration = float(ts[1])
    native_fps = n / duration if duration > 0 else 0.0
    del vr
    py = sys.executable
    wall_dec, rss_dec, out = _run_child([py, "-c", _DECODE_ONLY, str(video), "0"])
    dec = json.loads(out.strip().splitlines()[-1])
    decode_fps = dec["frames"] / dec["seconds"]
    with tempfile.TemporaryDirectory() as td:
        common = [py, "-m", "fer_batch.cli", "process", str(video), "--quiet", "--fps", str(fps), "--device", "cpu"]
        if threads:
            common += ["--threads", str(threads)]
        common += list(extra or [])
        wall_full, rss_full, _ = _run_child(common + ["--out", f"{td}/full.parquet"])
        short_end = min(short_s, duration / 2)
        wall_short, rss_short, _ = _run_child(common + ["--end", str(short_end), "--out", f"{td}/short.parquet"])
        full = pq.read_table(f"{td}/full.parquet")
        short = pq.read_table(f"{td}/short.parquet")
        src_full = pq.read_table(f"{td}/full.sources.parquet").to_pylist()[0]
        src_short = pq.read_table(f"{td}/short.sources.parquet").to_pylist()[0]
    d_wall = max(wall_full - wall_short, 1e-6)
    frames_full, frames_short = src_full["frames_sampled"], src_short["frames_sampled"]
    fi = full.column("frame_index").to_numpy()
    first = int((fi == fi.min()).sum()) if len(fi) else 0
    decode_rtf = decode_fps / native_fps if native_fps else 0.0
    rtf = (duration - short_end) / d_wall
    return BenchResult(
        video=str(video), duration_s=duration, native_fps=native_fps, decode_fps=decode_fps, decode_rtf=decode_rtf,
        wall_full_s=wall_full, wall_short_s=wall_short, rtf_steady=rtf,
        ratio_to_decode=rtf / decode_rtf if decode_rtf else 0.0,
        sampled_fps=(frames_full - frames_short) / d_wall, faces_per_s=(full.num_rows - short.num_rows) / d_wall,
        faces_per_frame=full.num_rows / max(frames_full, 1), faces_first_frame=first,
        peak_rss_mb_full=rss_full, peak_rss_mb_short=rss_short, peak_rss_mb_decode=rss_dec,
    )


def as_dict(r: BenchResult) -> dict:
    return asdict(r)
