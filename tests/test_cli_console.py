"""User-supplied strings in the CLI's terminal output: printed as text, never as Rich markup or
terminal control sequences (issue 11, item 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fer_batch.commands.console import clean, esc, text

ESC = "\x1b"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (not a terminal: no colour codes between the characters of a
    name; the summary table and error lines print as on a terminal)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_INTERACTIVE")} | {"COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fer_batch.cli", *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd,
        errors="surrogateescape",
    )


@pytest.mark.parametrize(
    "raw",
    [
        "clip[/x].mp4",
        "[link=https://example.com/]click[/link].mp4",
        "[bold red]x[/].mp4",
        "a\\[b].mp4",
        "trailing\\",
        "[/]",
    ],
)
def test_markup_like_names_print_verbatim(raw: str):
    con = Console(record=True, width=300, color_system=None)
    con.print(f"[red]error:[/red] [bold]{esc(raw)}[/bold] end")
    con.print(text(raw))
    out = con.export_text()
    assert out.splitlines() == [f"error: {raw} end", raw]
    assert "example.com" not in "".join(str(s.style) for s in con._record_buffer if s.style)


def test_control_sequences_are_made_visible():
    raw = f"evil{ESC}]8;;http://x{ESC}\\\\{ESC}[2J{ESC}[31mred\x07\x08\x9b\u202egpj.exe\udcff.mp4\tok\nline2"
    out = clean(raw)
    assert ESC not in out and "\x07" not in out and "\x9b" not in out and "\u202e" not in out and "\udcff" not in out
    assert "\\x1b]8;;http://x" in out and "\\x1b[2J" in out and "\\x07" in out and "\\u202e" in out and "\\udcff" in out
    assert "\tok\nline2" in out  # tabs and newlines are kept
    out.encode("utf-8")  # printable: no lone surrogates left
    con = Console(record=True, width=300, color_system=None)
    con.print(esc(raw))
    con.print(text(raw))
    assert ESC not in con.export_text()


@pytest.fixture(scope="module")
def markup_inputs(tmp_path_factory) -> Path:
    """``clip[/x].mp4`` (the folder ``clip[`` holding ``x].mp4``), a real video with faces, plus
    an image whose name holds an escape sequence and a non-UTF-8 byte."""
    from fer_batch.synth import make_sample_video, write_empty

    root = tmp_path_factory.mktemp("markup")
    d = root / "in" / "clip["
    d.mkdir(parents=True)
    make_sample_video(d / "x].mp4", seconds=1.0, fps=10, size=(320, 192))
    write_empty(root / "in" / f"a{ESC}[31mred [link=https://example.com]b[/link]\udcff.jpg")
    return root


def test_process_with_markup_and_escapes_in_names(markup_inputs: Path):
    """The folder `clip[` holding `x].mp4` and a name with an escape sequence: the run's exit
    code is that of the inputs (1: the empty image failed), not a MarkupError's, and what is
    printed carries the names as text, with no raw escape sequence of the file name."""
    out = markup_inputs / "o[" / "x].parquet"  # .../o[/x].parquet
    out.parent.mkdir(exist_ok=True)
    r = _cli("process", str(markup_inputs / "in"), "--out", str(out), "--fps", "2")
    both = r.stdout + r.stderr
    assert "Traceback" not in both and "MarkupError" not in both, both[-3000:]
    assert r.returncode == 1, both[-3000:]  # the empty .jpg failed; nothing else
    assert out.exists()
    assert "x].mp4" in both and "o[/x].parquet" in both
    assert "[31mred" not in both.replace("\\x1b[31mred", "")  # the name's escape only as visible text
    assert "\\x1b[31mred" in both
    # the report and summary commands print the same names safely
    html = markup_inputs / "o[" / "y].html"
    r = _cli("report", str(out), "--html", str(html))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "o[/y].html" in r.stderr
    r = _cli("summary", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "x].mp4" in r.stdout and "\\x1b[31mred" in r.stdout


def test_error_line_with_markup_in_path(tmp_path: Path):
    """A missing input and an output path with markup are printed verbatim (exit 1: the input
    failed; not a crash)."""
    bad = tmp_path / "no[" / "x]such.parquet"
    r = _cli("process", str(tmp_path / "nothing[/b].mp4"), "--out", str(bad))
    assert "Traceback" not in r.stderr and "MarkupError" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 1, r.stderr[-3000:]
    assert "nothing[/b].mp4" in r.stderr and "no[/x]such.sources.parquet" in r.stderr
    r = _cli("report", str(tmp_path / "gone[/y].parquet"), "--html", str(tmp_path / "a.html"))
    assert "Traceback" not in r.stderr and r.returncode in (1, 2) and "gone[/y].parquet" in r.stderr, r.stderr
