"""Review reports over the Parquet outputs of ``fer-batch process``.

- :func:`summarize`: the key figures (:class:`~fer_batch.report.figures.SessionFigures`).
- :func:`build_report`: the self-contained HTML review file.

The figures are pure functions over DataFrames (:mod:`fer_batch.report.figures`); this
module only reads Parquet, calls them and writes the page.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from fer_batch.errors import ConfigError, OutputError
from fer_batch.report.figures import Moment, MomentParams, SessionFigures, SourceFigures, session_figures
from fer_batch.report.load import ReportData, companion_path, load_report

log = logging.getLogger(__name__)

__all__ = [
    "MomentParams",
    "ReportData",
    "SessionFigures",
    "build_report",
    "companion_path",
    "load_report",
    "summarize",
]


def summarize(report: str | Path | ReportData, params: MomentParams | None = None) -> SessionFigures:
    """Key figures of a ``fer-batch process`` output (its faces Parquet path, or loaded data)."""
    data = report if isinstance(report, ReportData) else load_report(report)
    return session_figures(data.faces, data.sources, params or MomentParams())


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc), since
    setting it to read it races with other threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: the folder {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write in {parent}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the report gets what open() would
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e


def build_report(
    report: str | Path,
    html_out: str | Path,
    *,
    thumbnails: bool = False,
    per_page: int = 50,
    params: MomentParams | None = None,
) -> SessionFigures:
    """Write the HTML review of ``report`` (the faces Parquet) to ``html_out``.

    Args:
        report: the ``--out`` Parquet of ``fer-batch process`` (its ``.sources.parquet`` is read
            from beside it when present).
        html_out: the HTML file to write (atomically).
        thumbnails: cut face thumbnails at key moments from the source media (off by default:
            faces are personal data).
        per_page: rows per page of the sources table.
        params: key-moment thresholds.

    Returns:
        The figures shown in the report.
    """
    from fer_batch.report.html import render_html  # matplotlib is imported only here

    if per_page < 1:
        raise ConfigError(f"--max-sources-per-page: expected >= 1, got {per_page}")
    data = load_report(report)
    figs = session_figures(data.faces, data.sources, params or MomentParams())
    thumbs_for = None
    if thumbnails:
        from fer_batch.report.thumbs import ThumbRequest, cut_thumbnails

        def thumbs_for(sf: SourceFigures, moments: list[Moment]):
            reqs = [ThumbRequest(m.frame_index, m.time_s, m.box) for m in moments]
            got, note = cut_thumbnails(sf.path, reqs)
            return {id(m): got[k] for k, m in enumerate(moments) if k in got}, note

    meta = data.meta
    bits = [str(data.path)]
    if meta.get("version"):
        bits.append(f"fer-batch {meta['version']}")
    models = meta.get("models")
    if isinstance(models, dict) and models:
        names = [
            f"{k} {v.get('name') or '?'}" if isinstance(v, dict) else f"{k} {v}" for k, v in models.items()
        ]
        bits.append("models: " + ", ".join(names))
    if figs.smoothed:
        bits.append("smoothed probabilities")
    html_text = render_html(
        figs, data.faces, title=f"Session review: {Path(report).name}", subtitle=" · ".join(bits),
        per_page=per_page, thumbs_for=thumbs_for,
    )
    _atomic_write_text(Path(html_out), html_text)
    log.info("wrote %s (%d sources, %.1f MB)", html_out, len(figs.sources), len(html_text) / 1e6)
    return figs
