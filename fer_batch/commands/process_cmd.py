"""``fer-batch process``: inputs -> per-face emotion rows in Parquet."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fer_batch.commands.console import esc, text
from fer_batch.config import config_from_options
from fer_batch.errors import ConfigError, FerBatchError, OutputError

log = logging.getLogger(__name__)


class ProgressHook:
    """A rich progress bar (sources and frames of the current source) driven by pipeline hooks."""

    def __init__(self, progress: Progress, n_sources: int | None = None):
        self.p = progress
        self.sources = progress.add_task("sources", total=n_sources)
        self.frames = progress.add_task("frames", total=None)

    def __call__(self, step: str, payload: dict) -> None:
        if step == "run_start":
            self.p.update(self.sources, total=payload["sources"])
        elif step == "source_start":
            src = payload["source"]
            self.p.reset(self.frames, total=None, description=f"frames  {esc(Path(src.path).name[:40])}")
        elif step == "source_open":
            reader = payload.get("reader")
            est = getattr(reader, "planned_frames", None)
            if est:
                self.p.update(self.frames, total=est)
        elif step == "frame":
            self.p.advance(self.frames)
        elif step == "source_done":  # a source merged (a split source ends once, not per segment)
            self.p.advance(self.sources)


def summary_table(result) -> Table:
    t = Table(title=f"fer-batch: {result.sources.num_rows} inputs in {result.wall_s:.1f} s")
    for col in ("input", "status", "frames", "faces", "tracks", "wall s", "error"):
        t.add_column(col, overflow="fold")
    colour = {"ok": "green", "partial": "yellow", "skipped": "dim", "failed": "red"}
    for r in result.sources.to_pylist():
        st = r["status"]
        t.add_row(
            text(Path(r["path"]).name), text(st, colour.get(st, "")), str(r["frames_sampled"]), str(r["faces"]),
            str(r["tracks"]), f"{r['wall_s']:.1f}", text(r["error"]),
        )
    return t


# ``process`` parameters that are not configuration options; every other parameter is the
# config field declared with the same option name (``fer_batch.config.OPTIONS``), checked by
# tests/test_options.py.
CLI_ONLY = frozenset({"inputs", "out", "quiet", "incremental", "wait_lock", "retry_failed"})


def process(
    inputs: List[str] = typer.Argument(..., help="Video files, images, or directories (walked recursively)."),
    out: str = typer.Option(..., "--out", "-o", help="Output Parquet (report.parquet); .sources/.tracks.parquet are written beside it. With --incremental: a dataset directory."),
    fps: Optional[float] = typer.Option(None, help="Sample this many frames per second by real timestamps [default: 2]."),
    every: Optional[int] = typer.Option(None, help="Sample every N-th frame instead of --fps."),
    start: Optional[float] = typer.Option(None, help="Start time in seconds."),
    end: Optional[float] = typer.Option(None, help="End time in seconds."),
    max_frames: Optional[int] = typer.Option(None, help="At most this many sampled frames per source."),
    images_as: str = typer.Option("files", help="files: each image is a source; sequence: a folder is one video."),
    image_fps: float = typer.Option(1.0, help="Frame rate of image sequences."),
    decoder: str = typer.Option("auto", help="Video decoder: auto (PyAV; decord for raw streams without timestamps) | pyav | decord."),
    max_frame_pixels: int = typer.Option(4096 * 2160, help="Decoded pixels per video frame at most; larger videos are scaled down while decoding."),
    follow_links: bool = typer.Option(False, "--follow-links", help="Follow symbolic links that resolve outside the input folders (default: listed as skipped)."),
    det_pack: Optional[str] = typer.Option(None, help="InsightFace pack directory (e.g. ~/.insightface/models/buffalo_l); default: the shipped pack."),
    det_size: str = typer.Option("auto", help="Detector input: auto (long side 640, short side fitted to the frame's aspect ratio) | N (NxN) | WxH, multiples of 32 (larger finds smaller faces, slower)."),
    det_thresh: float = typer.Option(0.5, help="Detection score threshold (higher: fewer false faces, more misses)."),
    min_face: float = typer.Option(16.0, help="Drop faces whose box is smaller than this (pixels, shorter side)."),
    model: Optional[str] = typer.Option(None, help="Emotion model: registered name or path (default: the registry's default)."),
    batch_size: int = typer.Option(64, help="Faces per classifier batch."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Also classify each face's mirror image and average (default: as the model card says; the default model does, --no-tta halves the classifier's work)."),
    smooth: float = typer.Option(0.0, help="Temporal smoothing window per track, seconds (0 = off; raw values are always kept)."),
    reid: str = typer.Option("auto", help="Re-identify returning faces by embedding: auto (the detector pack's recognition model, else the default pack's face embedding) | on | off."),
    runner: str = typer.Option("local", help="local (in-process) | ray."),
    ray_address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Existing Ray cluster (auto, ray://host:10001); default: an embedded local instance."),
    num_workers: Optional[int] = typer.Option(None, help="Ray worker actors."),
    cpus_per_worker: float = typer.Option(1.0, help="CPUs per Ray worker."),
    gpus_per_worker: float = typer.Option(0.0, help="GPUs per Ray worker (fractions share a GPU)."),
    segment_seconds: Optional[float] = typer.Option(None, help="Split videos longer than this (seconds) into segments whose track ids are stitched [default: 300 with --runner ray; no splitting locally]."),
    source_timeout: str = typer.Option("auto", help="Wall-clock limit per input (per segment when split): auto (5 min + 2 s per second of media + 1 s per sampled frame) | SECONDS | off. The work runs in a worker process that is stopped at the limit; the input is then failed and the run goes on. off: in this process, no limit."),
    threads: int = typer.Option(0, help="CPU threads for model sessions, video decoding and OpenCV (0 = library defaults)."),
    models_dir: Optional[str] = typer.Option(None, envvar="FER_BATCH_MODELS_DIR", help="Model pack directory with cards."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table (for schedulers)."),
    incremental: bool = typer.Option(
        False, "--incremental",
        help="Scheduled runs: --out names a dataset DIRECTORY; process only new or changed inputs, exactly once "
        "(exit 3 when another run holds the lock). See jobs/schedule/README.md.",
    ),
    wait_lock: float = typer.Option(0.0, "--wait-lock", help="--incremental: wait up to this many seconds for another run's lock."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="--incremental: retry inputs that failed before even if unchanged."),
) -> None:
    """Process videos and image folders into per-face emotion time series (Parquet)."""
    options = {k: v for k, v in locals().items() if k not in CLI_ONLY}
    # Imported here, not at the top: ``fer-batch --help`` and the other commands need not load
    # the pipeline.
    from fer_batch.api import run
    from fer_batch.commands.incremental_cli import run_incremental_cli

    err = Console(stderr=True)
    try:
        cfg = config_from_options(**options)
        if incremental:
            raise typer.Exit(run_incremental_cli(
                inputs, out, cfg, quiet=quiet, wait_lock=wait_lock, retry_failed=retry_failed, err=err,
                progress=ProgressHook,
            ))
        if quiet:
            result = run(inputs, out=out, cfg=cfg)
        else:
            cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
            with Progress(*cols, console=err, transient=True) as p:
                result = run(inputs, out=out, cfg=cfg, hook=ProgressHook(p))
    except (ConfigError, OutputError) as e:
        err.print(f"[red]error:[/red] {esc(e)}")
        raise typer.Exit(2)
    except FerBatchError as e:
        err.print(f"[red]error:[/red] {esc(e)}")
        raise typer.Exit(2)
    statuses = result.sources.column("status").to_pylist()
    if not quiet:
        Console().print(summary_table(result))
        used = result.models
        det, cls = used.get("detector", {}), used.get("classifier", {})
        err.print(
            f"detector {det.get('name')} on {det.get('provider')}; classifier {cls.get('name')} on {cls.get('provider')}; "
            f"wrote {esc(result.out)}"
        )
    for r in result.sources.to_pylist():
        if r["status"] in ("partial", "skipped", "failed"):
            log.warning("%s: %s%s", r["path"], r["status"], f" ({r['error']})" if r["error"] else "")
    if "partial" in statuses or "skipped" in statuses:
        err.print(
            f"[yellow]warning:[/yellow] {statuses.count('partial')} partial, {statuses.count('skipped')} skipped input(s)"
        )
    if "failed" in statuses:
        err.print(f"[red]{statuses.count('failed')} input(s) failed[/red] (see {esc(result.out and result.out.replace('.parquet', '.sources.parquet'))})")
    raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    app.command("process")(process)
