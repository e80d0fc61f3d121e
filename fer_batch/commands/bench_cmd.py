"""``fer-batch bench``: steady-state throughput against decode-only, in one run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from fer_batch.commands.console import text


def bench(
    videos: List[Path] = typer.Argument(..., help="Video files to measure."),
    fps: float = typer.Option(2.0, help="Sampling rate of the measured runs."),
    short: float = typer.Option(5.0, help="Seconds of the short run subtracted to remove start-up."),
    threads: int = typer.Option(0, help="CPU threads for model sessions, video decoding and OpenCV (0 = library defaults)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write all results as JSON here."),
) -> None:
    """Real-time factor, sampled frames/s, faces/s and peak RSS next to decode-only throughput."""
    from fer_batch.bench import as_dict, bench_video

    results = []
    t = Table(title=f"fer-batch bench (sampling {fps} fps)")
    for col in ("video", "dur s", "decode fps", "decode RTF", "RTF steady", "ratio", "sampled/s", "faces/s", "faces/frame", "first", "RSS MB"):
        t.add_column(col)
    for v in videos:
        r = bench_video(v, fps=fps, short_s=short, threads=threads)
        results.append(as_dict(r))
        t.add_row(
            text(v.name), f"{r.duration_s:.1f}", f"{r.decode_fps:.0f}", f"{r.decode_rtf:.2f}", f"{r.rtf_steady:.2f}",
            f"{r.ratio_to_decode:.2f}", f"{r.sampled_fps:.1f}", f"{r.faces_per_s:.1f}", f"{r.faces_per_frame:.2f}",
            str(r.faces_first_frame), f"{r.peak_rss_mb_full:.0f}",
        )
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
