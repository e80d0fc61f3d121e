"""``fer-batch sample DIR``: write a sample video and image folder made from real faces."""

from __future__ import annotations

from pathlib import Path

import typer

from fer_batch.commands.console import clean
from fer_batch.errors import FerBatchError


def sample(
    directory: Path = typer.Argument(..., help="Folder to write sample_video.mp4 and images/ into."),
    seconds: float = typer.Option(6.0, "--seconds", help="Length of the sample video."),
    size: str = typer.Option("960x540", "--size", help="Video size WxH."),
) -> None:
    """Write a short video of the 6 faces of insightface's group photo moving over a
    background, plus a folder of photos in several formats (offline, a few seconds)."""
    from fer_batch.synth import write_sample_set

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        typer.echo(clean(f"error: --size: expected WxH such as 960x540, got {size!r}"), err=True)
        raise typer.Exit(2)
    if seconds <= 0 or w < 64 or h < 64:
        typer.echo("error: --seconds must be > 0 and --size at least 64x64", err=True)
        raise typer.Exit(2)
    try:
        out = write_sample_set(directory, seconds=seconds, size=(w, h))
    except FerBatchError as e:
        typer.echo(clean(f"error: {e}"), err=True)
        raise typer.Exit(1)
    vid = out["video"]
    typer.echo(clean(f"{vid.path}  ({vid.size[0]}x{vid.size[1]}, {vid.fps:g} fps, {vid.frame_count} frames, 6 faces)"))
    for img in out["images"]:
        typer.echo(clean(f"{img.path}  ({img.faces} faces, {img.note})"))


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)
