"""Issue 11 items 2, 3, 11: errors that are not the media's, stopping (SIGTERM, kill -9), exit codes.

Real parts only: generated videos, real model sessions, real subprocesses of ``fer-batch``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fer_batch.classify import EmotionClassifier
from fer_batch.config import RunConfig, config_from_options
from fer_batch.incremental import META_INCREMENTAL
from fer_batch.pipeline import Stages, process_source
from fer_batch.types import MediaSource
from procs import gone, workers_of  # tests/ is on sys.path (rootdir conftest)


class _FailingSession(EmotionClassifier):
    """The real classifier whose ONNX Runtime session really fails from its second batch on:
    it is handed an input of the wrong rank, as a broken provider or model would fail."""

    calls = 0

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        type(self).calls += 1  # batches
        return super().__call__(crops)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if type(self).calls >= 2:
            x = x[:, 0]  # wrong rank: onnxruntime raises (InvalidArgument)
        return super()._run(x)


def _source(path) -> MediaSource:
    from fer_batch.io import discover

    sources, _ = discover([str(path)], RunConfig().sampling)
    return sources[0]


def test_a_runtime_error_after_the_first_frames_is_failed_not_partial(sample_video):
    """Item 3: only a decoder that breaks off is ``partial``; an ONNX Runtime error after the
    first frames makes the source ``failed`` with the error's type, and it keeps no rows."""
    cfg = config_from_options(batch_size=2, reid="off", fps=4.0, max_frames=4)
    stages = Stages(cfg).setup()
    stages.classifier.__class__ = _FailingSession
    _FailingSession.calls = 0
    try:
        res = process_source(_source(sample_video.path), stages, cfg)
    finally:
        stages.teardown()
    assert _FailingSession.calls >= 2  # the error came after a first good batch
    assert res.row.status == "failed", res.row
    assert res.row.error and ("Fail" in res.row.error or "InvalidArgument" in res.row.error), res.row.error
    assert res.faces.num_rows == 0
    assert res.row.frames_sampled > 0


def test_decoders_pass_io_and_memory_errors_through():
    """Item 3 in the decoders: FFmpeg's EIO / ENOMEM errors are the machine's (re-raised as they
    are: failed), a damaged stream's errors are the media's (DecodeError: partial)."""
    import errno

    import av

    from fer_batch.io.decoders import environment_error

    assert environment_error(av.error.OSError(errno.EIO, "Input/output error"))
    assert environment_error(av.error.MemoryError(errno.ENOMEM, "Cannot allocate memory"))
    assert environment_error(OSError(errno.ESTALE, "Stale file handle")) and environment_error(MemoryError())
    assert not environment_error(av.error.InvalidDataError(-1094995529, "Invalid data found when processing input"))
    assert not environment_error(RuntimeError("[h264] error while decoding MB 3 4"))


# --- real subprocesses: SIGTERM, kill -9, internal errors (items 2 and 11) ---------------------

FER_BATCH = Path(sys.executable).with_name("fer-batch")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inbox_media(tmp_path_factory) -> Path:
    """a.jpg, b_slow.mp4 (the source killed in progress), c.jpg: processed in that order."""
    import cv2

    from fer_batch import synth

    d = tmp_path_factory.mktemp("stop_media")
    img = synth.load_t1()
    cv2.imwrite(str(d / "a.jpg"), cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2)))
    synth.make_sample_video(d / "b_slow.mp4", seconds=3, fps=10, size=(320, 180), seed=3)
    cv2.imwrite(str(d / "c.jpg"), cv2.resize(img, (img.shape[1] * 2 // 5, img.shape[0] * 2 // 5)))
    return d


def _inbox(media: Path, dest: Path) -> Path:
    shutil.copytree(media, dest)
    return dest


def _cmd(inbox: Path, ds: Path, *extra: str) -> list[str]:
    return [str(FER_BATCH), "process", str(inbox), "--out", str(ds), "--incremental", "--quiet", "--fps", "10",
            "--device", "cpu", *extra]


def _start_and_signal_when_in_progress(cmd: list[str], ds: Path, name: str, sig: int) -> subprocess.Popen:
    """Start ``cmd``; as soon as the dataset's in-progress record says that this process is on
    ``name`` (a record left by an earlier run names another pid), send ``sig``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    rec = ds / "_state" / "in_progress.json"
    while proc.poll() is None:
        try:
            running = json.loads(rec.read_bytes())["running"]
        except (OSError, ValueError, KeyError):
            running = {}
        if any(Path(r["path"]).name == name and r.get("pid") == proc.pid for r in running.values()):
            proc.workers = workers_of(proc.pid)  # the local runner's worker processes
            os.kill(proc.pid, sig)
            break
        time.sleep(0.005)
    proc.wait(timeout=120)
    return proc


def _rows_per_input(ds: Path) -> dict[str, list[int]]:
    """Input name -> rows of each of its parts."""
    out: dict[str, list[int]] = {}
    for p in sorted(ds.glob("date=*/part-*.parquet")):
        inc = json.loads(pq.read_schema(p).metadata[META_INCREMENTAL])
        out.setdefault(Path(inc["source_path"]).name, []).append(pq.read_metadata(p).num_rows)
    return out


@pytest.fixture(scope="module")
def reference_rows(inbox_media, tmp_path_factory) -> dict[str, list[int]]:
    root = tmp_path_factory.mktemp("stop_ref")
    r = subprocess.run(_cmd(_inbox(inbox_media, root / "inbox"), root / "ds"), env=_env(), capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    rows = _rows_per_input(root / "ds")
    assert set(rows) == {"a.jpg", "b_slow.mp4", "c.jpg"} and rows["a.jpg"][0] > 0 and rows["c.jpg"][0] > 0
    return rows


@pytest.mark.slow
def test_sigterm_mid_run_exits_143_leaves_no_temp_files_and_a_consistent_dataset(inbox_media, reference_rows, tmp_path):
    """Item 11: SIGTERM while a source is in progress: exit code 143 (not 1), no temp file
    anywhere, the run summary says so, the source is not counted as a crash, and the next run
    completes the dataset with every input's rows exactly once."""
    inbox, ds = _inbox(inbox_media, tmp_path / "inbox"), tmp_path / "ds"
    proc = _start_and_signal_when_in_progress(_cmd(inbox, ds), ds, "b_slow.mp4", signal.SIGTERM)
    err = proc.stderr.read().decode()
    assert proc.returncode == 143, err[-3000:]
    assert proc.workers and all(gone(w) for w in proc.workers), "the worker outlived the stopped run"
    assert "Traceback" not in err, err[-3000:]
    assert not [p for p in ds.rglob("*") if p.name.endswith(".tmp")]
    summary = json.loads((ds / "_runs" / "latest.json").read_bytes())
    assert summary["exit_code"] == 143 and "SIGTERM" in summary["error"]
    ip = json.loads((ds / "_state" / "in_progress.json").read_bytes())
    assert ip == {"running": {}, "deaths": {}}  # stopped on purpose: not a crash of that source
    assert "b_slow.mp4" not in _rows_per_input(ds)  # it was in progress: nothing of it landed
    r = subprocess.run(_cmd(inbox, ds), env=_env(), capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert _rows_per_input(ds) == reference_rows


@pytest.mark.slow
def test_a_source_in_progress_when_two_runs_died_is_recorded_failed(inbox_media, reference_rows, tmp_path):
    """Item 2: kill -9 while b_slow.mp4 is in progress, in two runs in a row: the third run
    records it failed ("the process died while decoding this file in 2 runs", exit code 1),
    it has no rows, every other input has its rows exactly once; later runs skip it until
    --retry-failed."""
    inbox, ds = _inbox(inbox_media, tmp_path / "inbox"), tmp_path / "ds"
    for _ in range(2):
        proc = _start_and_signal_when_in_progress(_cmd(inbox, ds), ds, "b_slow.mp4", signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    r = subprocess.run(_cmd(inbox, ds), env=_env(), capture_output=True)
    assert r.returncode == 1, r.stderr.decode()[-3000:]
    summary = json.loads((ds / "_runs" / "latest.json").read_bytes())
    b = [o for o in summary["inputs"] if Path(o["path"]).name == "b_slow.mp4"]
    assert len(b) == 1 and b[0]["status"] == "failed", b
    assert b[0]["error"] == "the process died while decoding this file in 2 runs"
    rows = _rows_per_input(ds)
    assert "b_slow.mp4" not in rows
    assert rows == {k: v for k, v in reference_rows.items() if k != "b_slow.mp4"}
    from fer_batch.incremental import sources_table

    st = {Path(p).name: s for p, s in zip(sources_table(ds).column("path").to_pylist(),
                                          sources_table(ds).column("status").to_pylist())}
    assert st["b_slow.mp4"] == "failed"
    # later runs leave it alone (nothing to do); --retry-failed plans it again
    from fer_batch.incremental import IncrementalDataset

    cfg = config_from_options(fps=10.0, device="cpu")
    for retry, work in ((False, []), (True, ["b_slow.mp4"])):
        with IncrementalDataset(ds) as d:
            assert [Path(w.source.path).name for w in d.plan([inbox], cfg, retry_failed=retry).work] == work


@pytest.mark.slow
def test_sigterm_plain_run_writes_what_is_done_marked_incomplete(inbox_media, tmp_path):
    """Items 10 and 11 on a plain run: SIGTERM once the outputs are being written: exit code
    143, no temp file, and the outputs that appear say ``complete: false``."""
    from fer_batch.schema import read_metadata

    out = tmp_path / "out" / "report.parquet"
    cmd = [str(FER_BATCH), "process", str(inbox_media), "--out", str(out), "--quiet", "--fps", "10", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    while proc.poll() is None and not list(out.parent.glob(".report.parquet.*.tmp")):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    assert not list(out.parent.glob(".*.tmp"))
    for name in ("report.parquet", "report.sources.parquet", "report.tracks.parquet"):
        assert read_metadata(pq.read_schema(out.parent / name))["complete"] is False


def test_an_internal_error_has_its_own_exit_code(tmp_path):
    """Item 11: a bug (an exception no handler expects) exits 4 with its traceback, not 1."""
    code = ("import sys; from fer_batch import cli\n"
            "def boom():\n    raise RuntimeError('a bug')\n"
            "reg = cli._register_all\n"
            "cli._register_all = lambda: (reg(), cli.app.command('boom')(boom))\n"
            "sys.exit(cli.main(['boom']))\n")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 4, err
    assert "RuntimeError: a bug" in err and "internal error" in err
