"""``fer-batch bench``: steady-state throughput against decode-only, in one run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table


def bench(
    videos: List[Path] = typer.Argument(..., help="Video files to measure."),
    fps: float = typer.Option(2.0, help="Sampling rate of the measured runs."),
    every: Optional[int] = typer.Option(None, help="Sample every N-th frame instead of --fps."),
    short: float = typer.Option(5.0, help="Seconds of the short run subtracted to remove start-up."),
    threads: int = typer.Option(0, help="CPU threads for model sessions, video decoding and OpenCV (0 = library defaults)."),
    device: str = typer.Option("auto", help="Device of the measured runs, as `process --device` (default: what users run)."),
    decoder: str = typer.Option("auto", help="Video decoder of the measured runs: auto | pyav | decord."),
    rounds: int = typer.Option(1, help="Interleaved rounds (decode-only and pipeline alternate); medians are reported."),
    stages: Optional[bool] = typer.Option(None, "--stages/--no-stages", help="Also time detector frames/s and classifier faces/s separately [default: on for --device cuda]."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write all results as JSON here."),
) -> None:
    """Real-time factor, pipeline frames/s next to decord's and PyAV's decode-every-frame rates, faces/s, peak RSS."""
    from fer_batch.bench import as_dict, bench_video

    results = []
    what = f"every {every} frames" if every else f"{fps} fps"
    t = Table(title=f"fer-batch bench (sampling {what}, --device {device}, --decoder {decoder}, {rounds} round(s), medians)")
    cols = ("video", "dur s", "decode f/s decord", "decode f/s pyav", "pipeline f/s", "ratio", "RTF steady",
            "sampled/s", "faces/s", "faces/frame", "first", "RSS MB (largest / all)")
    for col in cols:
        t.add_column(col)
    for v in videos:
        r = bench_video(v, fps=fps, short_s=short, threads=threads, device=device, decoder=decoder, every=every,
                        rounds=rounds, stages=stages)
        results.append(as_dict(r))
        t.add_row(
            v.name, f"{r.duration_s:.1f}", f"{r.decode_fps:.0f}", f"{r.decode_fps_pyav:.0f}", f"{r.pipeline_fps:.0f}",
            f"{r.ratio_to_decode:.2f}", f"{r.rtf_steady:.2f}", f"{r.sampled_fps:.1f}", f"{r.faces_per_s:.1f}",
            f"{r.faces_per_frame:.2f}", str(r.faces_first_frame), f"{r.peak_rss_mb_full:.0f} / {r.peak_rss_mb_total:.0f}",
        )
    con = Console(width=None if sys.stdout.isatty() else 200)
    con.print(t)
    for r in results:
        if r["stages"]:
            s = r["stages"]
            con.print(
                f"{Path(r['video']).name}: detector {s['detector_frames_per_s']:.1f} frames/s (batch {s['detector_batch']}, "
                f"{s['detector_provider']}); classifier {s['classifier_faces_per_s']:.1f} faces/s ({s['classifier_provider']})"
            )
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
