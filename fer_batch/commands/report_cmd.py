"""``fer-batch report`` (HTML review) and ``fer-batch summary`` (key figures in the terminal)."""

from __future__ import annotations

import csv
import json
import sys
from enum import Enum
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from fer_batch.commands.console import clean, esc, text
from fer_batch.errors import ConfigError, FerBatchError
from fer_batch.types import EMOTIONS


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def _fail(e: Exception) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {esc(e)}", markup=True, highlight=False)
    raise typer.Exit(2 if isinstance(e, ConfigError) else 1)


def _params(peak: float, sustain: float, sustain_min: float, surprise: float, dwell: float):
    from fer_batch.report.figures import MomentParams

    return MomentParams(
        peak_threshold=peak, sustain_threshold=sustain, sustain_min_s=sustain_min,
        surprise_threshold=surprise, min_dwell_s=dwell,
    )


_PEAK = typer.Option(
    0.6, "--peak-threshold",
    help="Min probability of a negative-emotion peak. Higher: fewer, clearer peaks (mild ones missed); lower: more, incl. classifier noise.",
)
_SUSTAIN = typer.Option(
    0.5, "--sustain-threshold",
    help="Min probability held through a sustained negative stretch. Higher: only clear episodes, split at dips; lower: longer, weaker stretches.",
)
_SUSTAIN_MIN = typer.Option(
    3.0, "--sustain-min-s",
    help="Min duration (s) of a sustained negative stretch. Higher: brief episodes ignored; lower: short ones reported.",
)
_SURPRISE = typer.Option(
    0.5, "--surprise-threshold",
    help="A face's strongest surprise is reported at or above this probability. Higher: only unmistakable surprise.",
)
_DWELL = typer.Option(
    1.0, "--min-dwell-s",
    help="A dominant emotion must hold this long (s) to count as a change. Higher: only lasting changes; lower: counts flicker.",
)


def report(
    report_path: Path = typer.Argument(..., metavar="REPORT", help="The --out Parquet of `fer-batch process`, or an --incremental dataset folder."),
    html_out: Path = typer.Option(..., "--html", help="The HTML file to write (one self-contained file)."),
    thumbnails: bool = typer.Option(
        False, "--thumbnails/--no-thumbnails",
        help="Embed face thumbnails at key moments, cut from the source files now (faces are personal data: off by default).",
    ),
    per_page: int = typer.Option(50, "--max-sources-per-page", min=1, help="Rows per page of the sources table."),
    peak: float = _PEAK,
    sustain: float = _SUSTAIN,
    sustain_min: float = _SUSTAIN_MIN,
    surprise: float = _SURPRISE,
    dwell: float = _DWELL,
) -> None:
    """Write a self-contained HTML review of a session: per source, each face's emotion
    timeline, share of time per emotion, key moments, and a session summary.

    The page needs no network: plots are inline SVG, the few lines of script are inline. It
    opens on an index of sources (sortable, filterable, paged) and shows one source at a time.
    """
    from fer_batch.report import build_report

    try:
        figs = build_report(
            report_path, html_out, thumbnails=thumbnails, per_page=per_page,
            params=_params(peak, sustain, sustain_min, surprise, dwell),
        )
    except FerBatchError as e:
        _fail(e)
    n_mom = sum(len(s.moments) for s in figs.sources)
    Console(stderr=True).print(
        f"wrote {esc(html_out)} ({len(figs.sources)} sources, {figs.faces} faces, {n_mom} key moments"
        f"{', thumbnails' if thumbnails else ''})",
        highlight=False,
    )


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _num(v, nd: int = 1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def summary(
    report_path: Path = typer.Argument(..., metavar="REPORT", help="The --out Parquet of `fer-batch process`, or an --incremental dataset folder."),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="table (terminal), csv (one row per source) or json."),
    peak: float = _PEAK,
    sustain: float = _SUSTAIN,
    sustain_min: float = _SUSTAIN_MIN,
    surprise: float = _SURPRISE,
    dwell: float = _DWELL,
) -> None:
    """The report's key figures: a table in the terminal, or CSV / JSON on stdout.

    CSV has one row per source; JSON has the session totals, one object per source and every
    key moment.
    """
    from fer_batch.report import summarize

    try:
        figs = summarize(report_path, _params(peak, sustain, sustain_min, surprise, dwell))
    except FerBatchError as e:
        _fail(e)
    if fmt is Format.json:
        typer.echo(json.dumps(figs.to_json_dict(), indent=2, default=str))
        return
    rows = [s.summary_row() for s in figs.sources]
    if fmt is Format.csv:
        cols = list(rows[0]) if rows else ["source_id", "path", "status"]
        w = csv.DictWriter(sys.stdout, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        return
    s = figs.summary()
    con = Console()
    st = ", ".join(f"{v} {k}" for k, v in figs.status_counts.items() if v)
    top = Table(title=f"Session: {esc(report_path.name)}", show_header=False)
    top.add_column("figure", style="bold")
    top.add_column("value")
    top.add_row("sources", f"{len(figs.sources)} ({st})")
    top.add_row("duration", f"{_num(figs.duration_s)} s")
    top.add_row("faces (tracks)", str(figs.faces))
    top.add_row("face time", f"{_num(figs.face_time_s)} s")
    top.add_row("positive/negative/neutral/surprise", " / ".join(_pct(figs.valence[g]) for g in ("positive", "negative", "neutral", "surprise")))
    top.add_row("per emotion", ", ".join(f"{e} {_pct(figs.shares[e])}" for e in EMOTIONS))
    top.add_row("emotion changes per minute", _num(figs.changes_per_min))
    top.add_row("key moments", str(s["key_moments"]))
    con.print(top)
    t = Table(
        title="Sources", box=box.SIMPLE_HEAD, pad_edge=False,
        caption="valence %: share of face time positive/negative/neutral/surprise",
    )
    t.add_column("source", no_wrap=True, overflow="ellipsis", min_width=8, max_width=40)
    wide = con.width >= 110  # the top-negative column only where it fits
    for c in ("status", "dur s", "faces", "valence %", "dominant", "chg/min", "moments", "top negative")[: 8 if wide else 7]:
        t.add_column(c, no_wrap=True, justify="left" if c in ("status", "dominant", "top negative") else "right")
    notes = []
    for sf, r in zip(figs.sources, rows):
        val = "/".join(f"{100 * sf.valence[g]:.0f}" for g in ("positive", "negative", "neutral", "surprise")) if sf.rows else "–"
        t.add_row(
            text(Path(sf.path).name), text(sf.status), _num(sf.duration_s), str(sf.faces), val,
            text(sf.dominant or "–"), _num(sf.changes_per_min), str(r["key_moments"]), *([text(r["top_negative"] or "–")] if wide else []),
        )
        if sf.error:
            notes.append(f"{Path(sf.path).name} ({sf.status}): {sf.error}")
    con.print(t)
    for n in notes:
        con.print(clean(n), highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
    app.command("summary")(summary)
