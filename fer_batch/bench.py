"""Throughput benchmark of ``fer-batch process`` against decode-only, in one run.

For each video, in rounds that interleave the measurements (so a busy box disturbs them
alike):

1. decode-only, every frame, with decord (``VideoReader.next()``: the ceiling the ratio is
   taken against) and with PyAV (``container.decode``);
2. a full ``process`` run and a run of only the first few seconds, exactly as users run it
   (the default ``--device auto`` unless ``--device`` is given; ``--decoder`` likewise).

The steady-state real-time factor (video seconds per wall second, start-up excluded) is
``(duration_full - duration_short) / (wall_full - wall_short)``; the ratio is the pipeline's
steady-state source frames/s over decord's decode-every-frame frames/s of the same round, and
the reported figures are medians over the rounds. Each run is a separate process; its peak
RSS is the child's own (``os.wait4``; Linux keeps the parent's peak across ``exec``, so this
process stays small: it imports neither decord nor the models).

``stage_rates`` (``--stages``, on by default for ``--device cuda``) times the detector (frames
per second, batched on a GPU) and the classifier (faces per second) separately on frames of
the video.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq


@dataclass
class BenchResult:
    video: str
    duration_s: float
    native_fps: float
    decoder: str  # --decoder given to the pipeline (auto|pyav|decord)
    device: str  # --device given to the pipeline
    rounds: int
    decode_fps: float  # decord, every frame, frames per wall second (median)
    decode_fps_pyav: float  # PyAV, every frame (median)
    decode_rtf: float  # video seconds per wall second, decord decode-only (the ceiling)
    wall_full_s: float
    wall_short_s: float
    rtf_steady: float  # video seconds per wall second, start-up excluded (median)
    pipeline_fps: float  # source frames per wall second covered by the pipeline (steady, median)
    ratio_to_decode: float  # median over rounds of pipeline_fps / decode_fps (same round)
    sampled_fps: float  # sampled frames per wall second (steady)
    faces_per_s: float  # faces classified per wall second (steady)
    faces_per_frame: float
    faces_first_frame: int
    frames_sampled: int
    peak_rss_mb_full: float
    peak_rss_mb_short: float
    peak_rss_mb_decode: float
    peak_rss_mb_total: float = 0.0  # the full run's processes together (driver + worker), sampled
    ratios: list = field(default_factory=list)  # per round
    stages: dict | None = None  # detector frames/s, classifier faces/s (stage_rates)


def tree_rss_mb(pid: int) -> float:
    """Summed resident memory (MB) of ``pid`` and its descendants, from /proc (0 elsewhere)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = {pid}, {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - tree
        tree |= frontier
    kb = 0
    for p in tree:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb += int(line.split()[1])
        except OSError:
            pass
    return kb / 1024.0


def _run_child(args: list[str], env: dict | None = None, totals: list[float] | None = None) -> tuple[float, float, str]:
    """Run a child python; return (wall seconds, peak RSS MB, stdout).

    ``os.wait4`` gives this child's own rusage: the peak RSS of its largest process (the
    process itself or a child it waited for, such as the local runner's worker), unlike
    RUSAGE_CHILDREN; stderr goes to a temporary file so a chatty child cannot block on a full
    pipe. When ``totals`` is given, the peak of the summed RSS of the child and its
    descendants (sampled every 0.1 s from /proc) is appended to it.
    """
    import threading

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        chunks: list[str] = []
        reader = threading.Thread(target=lambda: chunks.append(p.stdout.read()), daemon=True)
        reader.start()
        peak_total = 0.0
        while totals is not None and reader.is_alive():
            peak_total = max(peak_total, tree_rss_mb(p.pid))
            reader.join(0.1)
        reader.join()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(args)} exited {p.returncode}: {err.read()[-2000:]}")
    if totals is not None:
        totals.append(max(peak_total, ru.ru_maxrss / 1024.0))
    return wall, ru.ru_maxrss / 1024.0, "".join(chunks)


_DECODE_ONLY = r"""
import sys, time, json
path, threads, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
n = 0
if backend == "decord":
    import decord
    vr = decord.VideoReader(path, num_threads=threads)
    for i in range(len(vr)):
        vr.next()
        n += 1
else:
    import av
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        if threads:
            s.codec_context.thread_count = threads
        for f in c.decode(s):
            n += 1
dt = time.perf_counter() - t0
print(json.dumps({"frames": n, "seconds": dt}))
"""


def _video_info(video: Path) -> tuple[int, float]:
    """(frames, duration s) from the container, via PyAV (no decoding)."""
    import av

    with av.open(str(video)) as c:
        s = c.streams.video[0]
        n, end, start = 0, None, None
        for pk in c.demux(s):
            if pk.pts is None:
                continue
            n += 1
            e = pk.pts + (pk.duration or 0)
            end = e if end is None else max(end, e)
            start = pk.pts if start is None else min(start, pk.pts)
        return n, float((end - start) * s.time_base) if n else 0.0


def decode_only(video: Path, backend: str, threads: int = 0) -> tuple[float, float]:
    """(frames per wall second decoding every frame, peak RSS MB) in a child process."""
    _, rss, out = _run_child([sys.executable, "-c", _DECODE_ONLY, str(video), str(threads), backend])
    d = json.loads(out.strip().splitlines()[-1])
    return d["frames"] / d["seconds"], rss


def bench_video(
    video: Path,
    fps: float = 2.0,
    short_s: float = 5.0,
    threads: int = 0,
    extra: list[str] | None = None,
    *,
    device: str = "auto",
    decoder: str = "auto",
    every: int | None = None,
    rounds: int = 1,
    stages: bool | None = None,
) -> BenchResult:
    n, duration = _video_info(video)
    native_fps = n / duration if duration > 0 else 0.0
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory() as td:
        common = [py, "-m", "fer_batch.cli", "process", str(video), "--quiet", "--device", device, "--decoder", decoder]
        common += ["--every", str(every)] if every else ["--fps", str(fps)]
        if threads:
            common += ["--threads", str(threads)]
        common += list(extra or [])
        short_end = min(short_s, duration / 2)
        for _ in range(max(1, rounds)):
            dec_fps, rss_dec = decode_only(video, "decord", threads)
            dec_fps_av, _ = decode_only(video, "pyav", threads)
            tot: list[float] = []
            wall_full, rss_full, _ = _run_child(common + ["--out", f"{td}/full.parquet"], totals=tot)
            wall_short, rss_short, _ = _run_child(common + ["--end", str(short_end), "--out", f"{td}/short.parquet"])
            full = pq.read_table(f"{td}/full.parquet")
            short = pq.read_table(f"{td}/short.parquet")
            src_full = pq.read_table(f"{td}/full.sources.parquet").to_pylist()[0]
            src_short = pq.read_table(f"{td}/short.sources.parquet").to_pylist()[0]
            d_wall = max(wall_full - wall_short, 1e-6)
            rtf = (duration - short_end) / d_wall
            rows.append({
                "dec": dec_fps, "dec_av": dec_fps_av, "rss_dec": rss_dec, "wall_full": wall_full, "wall_short": wall_short,
                "rtf": rtf, "pipe_fps": rtf * native_fps, "ratio": rtf * native_fps / dec_fps,
                "sampled_fps": (src_full["frames_sampled"] - src_short["frames_sampled"]) / d_wall,
                "faces_per_s": (full.num_rows - short.num_rows) / d_wall, "rss_full": rss_full, "rss_short": rss_short,
                "rss_total": tot[0],
                "frames": src_full["frames_sampled"], "faces": full.num_rows,
                "first": _faces_first_frame(full),
            })
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    dec = med("dec")
    stage = None
    if stages if stages is not None else device.startswith("cuda"):
        stage = stage_rates(video, device=device, fps=fps, decoder=decoder)
    return BenchResult(
        video=str(video), duration_s=duration, native_fps=native_fps, decoder=decoder, device=device, rounds=len(rows),
        decode_fps=dec, decode_fps_pyav=med("dec_av"), decode_rtf=dec / native_fps if native_fps else 0.0,
        wall_full_s=med("wall_full"), wall_short_s=med("wall_short"), rtf_steady=med("rtf"), pipeline_fps=med("pipe_fps"),
        ratio_to_decode=med("ratio"), sampled_fps=med("sampled_fps"), faces_per_s=med("faces_per_s"),
        faces_per_frame=rows[-1]["faces"] / max(rows[-1]["frames"], 1), faces_first_frame=rows[-1]["first"],
        frames_sampled=rows[-1]["frames"], peak_rss_mb_full=max(r["rss_full"] for r in rows),
        peak_rss_mb_short=max(r["rss_short"] for r in rows), peak_rss_mb_decode=max(r["rss_dec"] for r in rows),
        peak_rss_mb_total=max(r["rss_total"] for r in rows),
        ratios=[r["ratio"] for r in rows], stages=stage,
    )


def _faces_first_frame(table) -> int:
    fi = table.column("frame_index").to_numpy()
    return int((fi == fi.min()).sum()) if len(fi) else 0


_STAGES = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from fer_batch.config import RunConfig, SamplingConfig
from fer_batch.io import MediaReader
from fer_batch.pipeline import Stages
from fer_batch.types import MediaSource
video, device, fps, decoder, n_max = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
cfg = RunConfig()
stages = Stages(cfg, device=device).setup()
det, cls = stages.detector, stages.classifier
with MediaReader(MediaSource(Path(video), "video", "bench"), SamplingConfig(fps=fps, decoder=decoder)) as r:
    frames = [f for _, f in zip(range(n_max), r)]
bs = max(1, det.batch_size)
det.detect_batch(frames[:bs])  # warm-up (CUDA kernels, memory pools)
t0 = time.perf_counter()
all_dets = []
for i in range(0, len(frames), bs):
    all_dets += det.detect_batch(frames[i:i + bs])
t_det = time.perf_counter() - t0
crops = [cls.crops(f.image, d.kps) for f, d in zip(frames, all_dets) if len(d)]
crops = np.concatenate(crops) if crops else np.zeros((0,))
if len(crops):
    cls(crops[: cls.cfg.batch_size])  # warm-up
t0 = time.perf_counter()
b = cls.cfg.batch_size
for i in range(0, len(crops), b):
    cls(crops[i:i + b])
t_cls = time.perf_counter() - t0
print(json.dumps({"frames": len(frames), "faces": int(len(crops)), "detector_batch": bs,
                  "detector_frames_per_s": len(frames) / t_det, "classifier_faces_per_s": len(crops) / max(t_cls, 1e-9),
                  "detector_provider": det.info["provider"], "classifier_provider": cls.info["provider"]}))
"""


def stage_rates(video: Path, device: str = "auto", fps: float = 2.0, decoder: str = "auto", max_frames: int = 256) -> dict:
    """Detector frames/s and classifier faces/s measured separately (in a child process)."""
    _, rss, out = _run_child([sys.executable, "-c", _STAGES, str(video), device, str(fps), decoder, str(max_frames)])
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = rss
    return res


def as_dict(r: BenchResult) -> dict:
    return asdict(r)
