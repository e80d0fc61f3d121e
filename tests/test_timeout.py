"""Issue 11 item 2: ``--source-timeout`` and the local runner's worker process.

Real parts only: generated videos and photos, real model sessions in a real worker process,
real signals. A "stuck" input is a long video given a short limit: the limit must really stop
the work (the worker is killed), the input is ``failed`` with a reason naming it, and the run
goes on with a fresh worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from fer_batch import synth
from fer_batch.api import run
from fer_batch.config import AUTO_TIMEOUT_BASE_S, RunConfig, config_from_options
from fer_batch.errors import ConfigError
from procs import gone, workers_of  # tests/ is on sys.path (rootdir conftest)


@pytest.fixture(scope="module")
def long_media(tmp_path_factory):
    """A 30 s video (minutes of work at --every 1 on 2 cores) between two photos."""
    d = tmp_path_factory.mktemp("timeout_media")
    synth.make_sample_video(d / "b_long.mp4", seconds=30, fps=25, size=(320, 180), seed=4)
    img = cv2.resize(synth.load_t1(), (640, 443))
    cv2.imwrite(str(d / "a_photo.jpg"), img)
    cv2.imwrite(str(d / "c_photo.jpg"), cv2.flip(img, 1))
    return d


def test_source_timeout_option_parses():
    assert RunConfig().source_timeout == "auto" and RunConfig().isolated
    assert config_from_options(source_timeout="off").isolated is False
    assert config_from_options(source_timeout="0").source_timeout == "off"
    assert config_from_options(source_timeout="90").source_time_limit(1e6, 10**6) == 90.0
    assert config_from_options(source_timeout="2.5").source_time_limit() == 2.5
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(ConfigError, match="--source-timeout"):
            config_from_options(source_timeout=bad)
    auto = RunConfig()
    assert auto.source_time_limit() == AUTO_TIMEOUT_BASE_S  # before the media's length is known
    # generous and proportional: 10 min of video at 2 fps (1,200 frames)
    assert auto.source_time_limit(600.0, 1200) == AUTO_TIMEOUT_BASE_S + 2 * 600 + 1200
    assert config_from_options(source_timeout="off").source_time_limit(600.0, 1200) is None


def test_a_source_over_its_limit_is_failed_and_the_run_goes_on(long_media, tmp_path):
    """The long video passes its 4 s limit: its worker is killed, it is ``failed`` ("timed out
    after 4 s", naming it, no rows), and the photo after it is processed by a fresh worker."""
    pids: dict[str, set] = {}

    def hook(step, payload):
        if step == "unit_done":
            pids.setdefault(payload["source"].path.name, set()).add(payload["pid"])

    out = tmp_path / "report.parquet"
    t0 = time.monotonic()
    res = run([long_media], out=out, every=1, reid="off", threads=1, source_timeout="4", hook=hook)
    wall = time.monotonic() - t0
    rows = {Path(r["path"]).name: r for r in res.sources.to_pylist()}
    assert rows["b_long.mp4"]["status"] == "failed", rows["b_long.mp4"]
    assert "timed out after 4 s" in rows["b_long.mp4"]["error"] and "b_long.mp4" in rows["b_long.mp4"]["error"]
    assert rows["a_photo.jpg"]["status"] == rows["c_photo.jpg"]["status"] == "ok"
    faces = res.faces.column("source_path").to_pylist()
    assert not [p for p in faces if p.endswith("b_long.mp4")]
    assert [p for p in faces if p.endswith("c_photo.jpg")]
    assert res.exit_code == 1
    # the photo after the stuck input ran in another worker process (the first was killed)
    assert pids["a_photo.jpg"] != pids["c_photo.jpg"], pids
    assert wall < 120, wall  # bounded: minutes of work were cut off at 4 s
    assert not workers_of(os.getpid()), "the run left a worker process behind"


def test_a_worker_that_dies_fails_only_its_input(long_media, sample_video, tmp_path):
    """A worker killed under an input (as a decoder segfault or an out-of-memory kill would)
    makes that input ``failed`` with the signal named; the next input gets a fresh worker."""
    killed: list[int] = []

    def hook(step, payload):
        if step == "frame" and payload["source"].path.name == sample_video.path.name and not killed:
            (pid,) = workers_of(os.getpid())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    photo = long_media / "c_photo.jpg"
    res = run([sample_video.path, photo], out=tmp_path / "r.parquet", reid="off", hook=hook)
    rows = {Path(r["path"]).name: r for r in res.sources.to_pylist()}
    bad = rows[sample_video.path.name]
    assert killed and bad["status"] == "failed", bad
    assert "killed by SIGKILL" in bad["error"] and sample_video.path.name in bad["error"], bad
    assert rows["c_photo.jpg"]["status"] == "ok" and rows["c_photo.jpg"]["faces"] > 0
    assert res.exit_code == 1


def test_off_runs_in_process_without_a_worker(long_media, tmp_path):
    seen: list[list[int]] = []

    def hook(step, payload):
        if step == "frame":
            seen.append(workers_of(os.getpid()))

    res = run([long_media / "a_photo.jpg"], out=tmp_path / "r.parquet", reid="off", source_timeout="off", hook=hook)
    assert res.sources.column("status").to_pylist() == ["ok"]
    assert seen and all(w == [] for w in seen)


def test_the_worker_dies_with_a_killed_run(long_media, tmp_path):
    """kill -9 of ``fer-batch process``: its worker process stops too (nothing keeps working)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fer_batch.cli", "process", str(long_media / "b_long.mp4"), "--every", "1",
         "--out", str(tmp_path / "r.parquet"), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while not workers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = workers_of(proc.pid)
        assert workers, f"no worker process started: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}"
        time.sleep(3)  # loading models / working
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 20
        while not all(gone(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(gone(w) for w in workers), "the worker outlived the killed run"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_incremental_records_a_timed_out_input_and_skips_it_until_retry(long_media, tmp_path):
    """--incremental: the input over its limit is recorded failed ("timed out") with no rows,
    the run exits 1; the next run leaves it alone (unchanged, failed before) and exits 0; with
    --retry-failed it is tried again."""
    from fer_batch.incremental import read_dataset, run_incremental

    cfg = config_from_options(every=1, reid="off", threads=1, source_timeout="4")
    ds = tmp_path / "ds"
    first = run_incremental([long_media], ds, cfg)
    by_name = {Path(o["path"]).name: o for o in first.outcomes}
    assert first.exit_code == 1
    assert by_name["b_long.mp4"]["status"] == "failed" and "timed out after 4 s" in by_name["b_long.mp4"]["error"]
    assert by_name["a_photo.jpg"]["status"] == by_name["c_photo.jpg"]["status"] == "ok"
    rows = read_dataset(ds, columns=["source_path"]).column("source_path").to_pylist()
    assert rows and not [p for p in rows if p.endswith("b_long.mp4")]
    second = run_incremental([long_media], ds, cfg)
    assert second.exit_code == 0 and second.counts["failed_before_unchanged"] == 1, second.summary
    third = run_incremental([long_media], ds, cfg, retry_failed=True)
    retried = {Path(o["path"]).name: o for o in third.outcomes}["b_long.mp4"]
    assert retried["status"] == "failed" and "timed out" in retried["error"] and third.exit_code == 1
