"""End to end over a generated corpus of bad and awkward inputs (issue 11): one
``fer-batch process`` run over ``tests/badcorpus.py``'s folder must finish in bounded time with
exit code 1 and no traceback; the video corrupt in the middle is ``partial`` with the rows
before the damage; every other bad input is ``failed`` or ``skipped`` with a reason naming it;
every good input is ``ok`` with rows; nothing is listed twice; names print safely.

Checks that depend on an issue-11 item not done in this tree are marked xfail naming the
item (``Case.leave_out``), so what remains is visible.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from badcorpus import ESC, KINDS, build_corpus  # tests/ is on sys.path (rootdir conftest)
from fer_batch import synth

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # a busy 2-core box needs ~10 min

# Generous: the run takes about 5 minutes on a 2-core box shared with other work (measured),
# far longer when starved of CPU; a stalled walk or a blocked open of a FIFO never ends.
RUN_LIMIT_S = 1500

# A launcher that runs the CLI as a child and reports the child's peak memory (so other tests'
# subprocesses do not count).
_LAUNCH = (
    "import resource, subprocess, sys; "
    "r = subprocess.run([sys.executable, '-m', 'fer_batch.cli', *sys.argv[1:]]); "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(r.returncode)"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial")
    corpus = build_corpus(root / "corpus")
    out = root / "out" / "report.parquet"
    out.parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, "process", str(corpus.root), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "400"},
        start_new_session=True,  # its own process group: a timeout stops the CLI under the launcher too
    )  # fmt: skip
    try:
        so, se = proc.communicate(timeout=RUN_LIMIT_S)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        so, se = proc.communicate()
        timed_out = True
    finally:
        corpus.close()
    r = proc
    stdout = (so or b"").decode("utf-8", "replace")
    stderr = (se or b"").decode("utf-8", "replace")
    sources = faces = None
    if out.exists():
        sources = pq.read_table(out.with_name("report.sources.parquet")).to_pylist()
        faces = pq.read_table(out, columns=["source_path", "frame_index"]).to_pandas()
    return {
        "corpus": corpus, "rc": None if timed_out else r.returncode, "timed_out": timed_out,
        "stdout": stdout, "stderr": stderr, "sources": sources, "faces": faces,
    }  # fmt: skip


def test_run_finishes_with_exit_code_1(run):
    assert not run["timed_out"], f"no end after {RUN_LIMIT_S} s:\n{run['stderr'][-3000:]}"
    assert run["rc"] == 1, run["stderr"][-3000:]  # some inputs failed; nothing else went wrong
    assert run["sources"] is not None


def test_no_traceback(run):
    both = run["stdout"] + run["stderr"]
    assert "Traceback" not in both, both[-5000:]


def _rows_for(run, path: Path) -> list[dict]:
    shown = path.as_posix()
    try:
        shown.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(shown).decode("utf-8", "backslashreplace")
    return [r for r in run["sources"] if r["path"] == shown]


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "8K video"])
def test_each_input_gets_its_status_and_reason(run, kind, request):
    if run["sources"] is None:
        pytest.fail("the run wrote no sources table")
    case = run["corpus"].case(kind)
    if case.leave_out:
        request.applymarker(pytest.mark.xfail(reason=f"needs {case.leave_out}", strict=False))
    paths = case.paths or [case.path]
    for p in paths:
        rows = _rows_for(run, p)
        if case.expect == ("absent",):
            assert rows == [], rows
            continue
        assert len(rows) == 1, (p, rows)  # listed exactly once
        (r,) = rows
        assert r["status"] in case.expect, r
        if r["status"] != "ok":
            assert r["error"] and Path(r["path"]).name in r["error"], r  # the reason names the file
        n = int((run["faces"]["source_path"] == r["path"]).sum())
        if case.rows is True:
            assert n > 0, (r, n)
        elif case.rows is False:
            assert n == 0, (r, n)


def test_corrupt_video_keeps_the_rows_before_the_damage(run):
    corpus = run["corpus"]
    (r,) = _rows_for(run, corpus.case("corrupt in the middle").path)
    assert r["status"] == "partial" and "decod" in r["error"], r
    good = corpus.case("good video").path
    samples = synth.sample_byte_ranges(good)
    a, b = corpus.corrupt_range
    first_hit = int(np.flatnonzero(samples[:, 0] + samples[:, 1] > a)[0])
    last_damaged = int(np.flatnonzero(samples[:, 0] < b)[-1])
    idx = run["faces"].loc[run["faces"]["source_path"] == r["path"], "frame_index"].to_numpy()
    assert len(idx) and idx.min() < first_hit  # rows from before the damage
    assert idx.max() <= last_damaged  # nothing invented from beyond it


def test_nothing_unexpected_is_listed(run):
    """Every row of the sources table is one of the corpus's inputs (the link web, loops and
    links outside add no rows of their own beyond their cases), each once."""
    corpus = run["corpus"]
    shown = {
        os.fsencode(p.as_posix()).decode("utf-8", "backslashreplace")
        for c in corpus.cases if c.expect != ("absent",) for p in (c.paths or [c.path])
    }  # fmt: skip
    listed = [r["path"] for r in run["sources"]]
    assert len(listed) == len(set(listed)), sorted(listed)
    assert set(listed) <= shown, sorted(set(listed) - shown)


def test_names_print_as_text(run):
    """File names with escape sequences and markup are printed visibly, never as terminal
    control sequences or Rich markup."""
    both = run["stdout"] + run["stderr"]
    assert f"{ESC}]0;title" not in both and f"{ESC}[31mred" not in both
    assert "\\x1b[31mred" in both  # the summary table shows the name, escaped
    assert "x].mp4" in both and "MarkupError" not in both


def test_peak_memory_is_bounded(run):
    """The whole run stays under 1.5 GB (issue 11 item 6's bound, here without the 8K video)."""
    peak = [int(line.split()[1]) for line in run["stderr"].splitlines() if line.startswith("PEAK_RSS_KB")]
    assert peak and peak[0] < 1.5 * 1024 * 1024, peak
