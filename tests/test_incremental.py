"""Incremental, exactly-once runs (``process --incremental``) on small real media.

Real pipeline (default detector and classifier), real Parquet read back with pyarrow, pandas
and duckdb, a real ``kill -9`` of a running ``fer-batch`` process. A module-wide reference
dataset gives the expected rows per input, so "exactly once" is checked against real counts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from fer_batch import synth
from fer_batch.config import RunConfig
from fer_batch.errors import OutputError
from fer_batch.incremental import (
    META_INCREMENTAL,
    DatasetLock,
    IncrementalDataset,
    LockHeldError,
    State,
    model_fingerprint,
    read_dataset,
    run_fingerprint,
    sources_table,
    run_incremental,
)
from fer_batch.schema import META_SCHEMA_VERSION

FER_BATCH = Path(sys.executable).with_name("fer-batch")
CFG = RunConfig().replace(classify={"device": "cpu"})
N_VIDEOS = 6


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """6 short real videos (distinct motion), one photo, one text file."""
    d = tmp_path_factory.mktemp("inc_media")
    for i in range(N_VIDEOS):
        synth.make_sample_video(d / f"clip{i}.mp4", seconds=2, fps=10, size=(320, 180), seed=i)
    import cv2

    img = synth.load_t1()
    cv2.imwrite(str(d / "group.jpg"), cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2)))
    synth.write_text_file(d / "notes.txt")
    return d


def _inbox(media: Path, dest: Path, names: list[str] | None = None) -> Path:
    dest.mkdir(parents=True)
    for f in sorted(media.iterdir()):
        if names is None or f.name in names:
            shutil.copy2(f, dest / f.name)
    return dest


@pytest.fixture(scope="module")
def reference(media, tmp_path_factory) -> dict[str, int]:
    """Rows per input file name from one clean run over all the media."""
    root = tmp_path_factory.mktemp("inc_ref")
    inbox = _inbox(media, root / "inbox")
    res = run_incremental(inbox, root / "ds", CFG)
    assert res.exit_code == 0, res.summary
    t = read_dataset(root / "ds")
    counts = {}
    for path in t.column("source_path").to_pylist():
        counts[Path(path).name] = counts.get(Path(path).name, 0) + 1
    for o in res.outcomes:  # inputs without faces have no rows but must be known
        if o["outcome"] == "new":
            counts.setdefault(Path(o["path"]).name, 0)
    return {"counts": counts, "summary": res.summary, "root": root}


def _check_exactly_once(ds: Path, expected: dict[str, int]) -> None:
    """Every expected input has exactly one part and exactly its reference rows."""
    parts = sorted(ds.glob("date=*/part-*.parquet"))
    per_source: dict[str, list[Path]] = {}
    for p in parts:
        inc = json.loads(pq.read_schema(p).metadata[META_INCREMENTAL])
        per_source.setdefault(Path(inc["source_path"]).name, []).append(p)
    assert {k: len(v) for k, v in per_source.items()} == {k: 1 for k in expected}
    t = pads.dataset(str(ds), partitioning="hive").to_table()
    got: dict[str, int] = {k: 0 for k in expected}
    for path in t.column("source_path").to_pylist():
        got[Path(path).name] += 1
    assert got == expected
    keys = t.select(["source_id", "frame_index", "track_id"]).to_pylist()
    assert len({tuple(k.values()) for k in keys}) == len(keys), "duplicate rows"
    assert not list(ds.glob("date=*/.*.tmp"))


# --- first run, readers, no-op rerun -----------------------------------------------------------


def test_first_run_dataset_reads_as_one_table(reference):
    s, ds = reference["summary"], reference["root"] / "ds"
    assert s["counts"]["new"] == N_VIDEOS + 1 and s["counts"]["skipped"] == 1 and s["counts"]["failed"] == 0
    assert s["models_loaded"] and s["sources_decoded"] == N_VIDEOS + 1
    assert all(reference["counts"][f"clip{i}.mp4"] > 0 for i in range(N_VIDEOS))
    total = sum(reference["counts"].values())
    assert s["rows_written"] == total
    # pyarrow sees the part files and nothing else (state, runs, lock are _/. names)
    d = pads.dataset(str(ds), partitioning="hive")
    assert all(Path(f).name.startswith("part-") for f in d.files) and len(d.files) == N_VIDEOS + 1
    t = d.to_table()
    assert t.num_rows == total and "date" in t.column_names
    import pandas as pd

    assert len(pd.read_parquet(ds)) == total
    duckdb = pytest.importorskip("duckdb")
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{ds}/date=*/*.parquet', hive_partitioning=true)").fetchall()[0][0]
    assert n == total
    n_all = duckdb.sql(f"SELECT count(*) FROM read_parquet('{ds}/**/*.parquet', hive_partitioning=true)").fetchall()[0][0]
    assert n_all == total
    # metadata: schema version and the incremental record in each part
    meta = pq.read_schema(d.files[0]).metadata
    assert meta[META_SCHEMA_VERSION] and json.loads(meta[META_INCREMENTAL])["content"].startswith("b2:")
    src = sources_table(ds).to_pylist()
    assert len(src) == N_VIDEOS + 1 and {r["status"] for r in src} == {"ok"}
    assert {Path(r["path"]).name: r["faces"] for r in src} == reference["counts"]
    run = json.loads((ds / "_runs" / f"{s['run_id']}.json").read_text())
    assert run["exit_code"] == 0 and {o["outcome"] for o in run["inputs"]} == {"new", "skipped"}


def test_unchanged_rerun_is_a_fast_noop(reference, tmp_path):
    root = reference["root"]
    before = sorted(p.name for p in (root / "ds").glob("date=*/part-*.parquet"))
    res = run_incremental(root / "inbox", root / "ds", CFG)
    s = res.summary
    assert s["nothing_to_do"] and res.exit_code == 0
    assert s["counts"]["unchanged"] == N_VIDEOS + 1 and s["counts"]["new"] == s["counts"]["changed"] == 0
    assert s["sources_decoded"] == 0 and not s["models_loaded"] and s["files_hashed"] == 0
    assert s["reconcile"]["parts_read"] == 0  # the state was trusted: no footer read
    assert sorted(p.name for p in (root / "ds").glob("date=*/part-*.parquet")) == before
    # the CLI says so
    t0 = time.perf_counter()
    r = subprocess.run([str(FER_BATCH), "process", str(root / "inbox"), "--out", str(root / "ds"), "--incremental"],
                       capture_output=True, text=True, timeout=120, env=_env())
    wall = time.perf_counter() - t0
    assert r.returncode == 0 and "nothing to do" in r.stderr, r.stderr
    latest = json.loads((root / "ds" / "_runs" / "latest.json").read_text())
    assert latest["sources_decoded"] == 0 and not latest["models_loaded"]
    # the run itself (lock, reconcile, discover, stat) takes well under a second; the whole
    # command is bounded by interpreter start-up, loose here for a loaded 2-core box
    assert latest["wall_s"] < 5 and s["wall_s"] < 5, (latest["wall_s"], s["wall_s"])
    assert wall < 60, wall
    # touch: new mtime, same content -> hashed once, still unchanged, nothing decoded
    clip = root / "inbox" / "clip0.mp4"
    os.utime(clip, ns=(time.time_ns(), time.time_ns()))
    res = run_incremental(root / "inbox", root / "ds", CFG)
    assert res.summary["nothing_to_do"] and res.summary["files_hashed"] == 1 and res.summary["sources_decoded"] == 0
    res = run_incremental(root / "inbox", root / "ds", CFG)
    assert res.summary["files_hashed"] == 0


# --- changes --------------------------------------------------------------------------------------


def test_changed_file_and_config_reprocess_and_replace_old_rows(media, reference, tmp_path):
    names = ["clip0.mp4", "clip1.mp4", "group.jpg"]
    inbox = _inbox(media, tmp_path / "inbox", names)
    ds = tmp_path / "ds"
    run_incremental(inbox, ds, CFG)
    parts0 = {p.name: p for p in ds.glob("date=*/part-*.parquet")}
    # replace clip1 by different content (clip2's motion) under the same name
    shutil.copy(media / "clip2.mp4", inbox / "clip1.mp4")
    res = run_incremental(inbox, ds, CFG)
    assert res.counts["changed"] == 1 and res.counts["unchanged"] == 2 and res.summary["sources_decoded"] == 1
    changed = next(o for o in res.outcomes if o["outcome"] == "changed")
    assert Path(changed["path"]).name == "clip1.mp4" and changed["reason"] == "content changed"
    assert res.summary["parts_removed"] == 1
    parts1 = {p.name: p for p in ds.glob("date=*/part-*.parquet")}
    assert len(parts1) == 3 and len(set(parts0) & set(parts1)) == 2
    expected = {"clip0.mp4": reference["counts"]["clip0.mp4"], "clip1.mp4": reference["counts"]["clip2.mp4"],
                "group.jpg": reference["counts"]["group.jpg"]}
    _check_exactly_once(ds, expected)
    # a configuration change that changes rows reprocesses everything; one that does not, nothing
    res = run_incremental(inbox, ds, CFG.replace(classify={"batch_size": 7}))
    assert res.summary["nothing_to_do"]
    res = run_incremental(inbox, ds, CFG.replace(sampling={"fps": 1.0}))
    assert res.counts["changed"] == 3 and all(
        o["reason"] == "models or configuration changed" for o in res.outcomes if o["outcome"] == "changed"
    )
    parts2 = list(ds.glob("date=*/part-*.parquet"))
    assert len(parts2) == 3 and not set(p.name for p in parts2) & set(parts1)
    t = read_dataset(ds)
    assert t.num_rows == res.summary["rows_written"] < sum(expected.values())


def test_model_fingerprint_follows_the_cards(tmp_path):
    from fer_batch.models import default_models_dir

    models = tmp_path / "models"
    shutil.copytree(default_models_dir(), models)
    cfg = RunConfig(models_dir=str(models))
    fp1 = model_fingerprint(cfg)
    assert fp1["detector"]["sha256"] and fp1["classifier"]["sha256"]
    assert run_fingerprint(fp1, cfg) == run_fingerprint(model_fingerprint(cfg), cfg)
    # a changed card (e.g. new weights after `models build`) changes the run fingerprint
    from fer_batch.models import Registry

    card = Registry.from_dir(models).default("emotion_classification").card_path  # the card a run uses
    card.write_text(card.read_text() + "\n# rebuilt\n")
    fp2 = model_fingerprint(cfg)
    assert fp2["classifier"]["card_sha256"] != fp1["classifier"]["card_sha256"]
    assert run_fingerprint(fp2, cfg) != run_fingerprint(fp1, cfg)
    # device / batch size / runner do not change rows, sampling does
    assert run_fingerprint(fp1, cfg) == run_fingerprint(fp1, cfg.replace(classify={"device": "cpu", "batch_size": 3}))
    assert run_fingerprint(fp1, cfg) != run_fingerprint(fp1, cfg.replace(sampling={"every": 5, "fps": None}))


def test_failed_input_recorded_and_retried_only_when_changed(tmp_path, media):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    synth.write_random_bytes(inbox / "broken.mp4", 20_000)
    ds = tmp_path / "ds"
    res = run_incremental(inbox, ds, CFG)
    assert res.exit_code == 1 and res.counts["failed"] == 1
    assert [(r["status"], Path(r["path"]).name) for r in sources_table(ds).to_pylist()] == [("failed", "broken.mp4")]
    res = run_incremental(inbox, ds, CFG)
    assert res.exit_code == 0 and res.summary["nothing_to_do"] and res.counts["failed_before_unchanged"] == 1
    assert res.summary["sources_decoded"] == 0
    # the file is fixed (a good video lands under the same name): processed, failure cleared
    shutil.copy(media / "clip3.mp4", inbox / "broken.mp4")
    res = run_incremental(inbox, ds, CFG)
    assert res.exit_code == 0 and res.counts["changed"] == 1 and res.summary["rows_written"] > 0
    assert not json.loads((ds / "_state" / "state.json").read_text())["failed"]


# --- crashes ---------------------------------------------------------------------------------------


def _wait_for(pattern_dir: Path, glob: str, proc: subprocess.Popen, timeout: float = 240) -> list[Path]:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        found = list(pattern_dir.glob(glob)) if pattern_dir.exists() else []
        if found or proc.poll() is not None:
            return found
        time.sleep(0.005)
    return []


def test_kill9_mid_run_then_rerun_leaves_every_input_exactly_once(media, reference, tmp_path):
    """kill -9 as soon as the first part has landed (the other crash windows, an open temp
    file and a lagging state, are built exactly in the next test)."""
    inbox = _inbox(media, tmp_path / "inbox", [f"clip{i}.mp4" for i in range(N_VIDEOS)])
    ds = tmp_path / "ds"
    cmd = [str(FER_BATCH), "process", str(inbox), "--out", str(ds), "--incremental", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    found = _wait_for(ds, "date=*/part-*.parquet", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert found, f"the run ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    done = len(list(ds.glob("date=*/part-*.parquet")))
    assert done < N_VIDEOS, "killed too late to test anything"
    res = run_incremental(inbox, ds, CFG)
    assert res.exit_code == 0
    rec = res.summary["reconcile"]
    assert res.counts["new"] + res.counts["unchanged"] == N_VIDEOS
    assert res.counts["unchanged"] == done - rec["superseded_removed"]
    expected = {f"clip{i}.mp4": reference["counts"][f"clip{i}.mp4"] for i in range(N_VIDEOS)}
    _check_exactly_once(ds, expected)
    # and again: nothing left to do
    assert run_incremental(inbox, ds, CFG).summary["nothing_to_do"]


def test_crash_leftovers_are_reconciled_without_reprocessing(reference, tmp_path):
    src = reference["root"]
    ds = tmp_path / "ds"
    shutil.copytree(src / "ds", ds)
    parts = sorted(ds.glob("date=*/part-*.parquet"))
    # 1) an orphan temp file of a part that was being written
    orphan = parts[0].with_name(f".{parts[0].name}.deadbeef.tmp")
    orphan.write_bytes(b"PAR1 half written")
    # 2) two parts for one source: the new one landed, the old one was not yet deleted
    old = parts[1]
    t = pq.read_table(old)
    inc = json.loads(t.schema.metadata[META_INCREMENTAL])
    newer_run = "29991231T235959000000Z-abcdef"
    inc.update(run_id=newer_run, written_ns=inc["written_ns"] + 1)
    meta = dict(t.schema.metadata)
    meta[META_INCREMENTAL] = json.dumps(inc).encode()
    newer = old.with_name(f"part-{newer_run}-{inc['source_id']}.parquet")
    pq.write_table(t.replace_schema_metadata(meta), newer)
    # 3) the state lags: it does not know the newer part
    expected = {k: v for k, v in reference["counts"].items()}
    res = run_incremental(src / "inbox", ds, CFG)
    rec = res.summary["reconcile"]
    assert rec["temp_removed"] == 1 and rec["superseded_removed"] == 1
    assert not orphan.exists() and not old.exists() and newer.exists()
    assert res.summary["nothing_to_do"] and res.summary["sources_decoded"] == 0
    _check_exactly_once(ds, expected)


def test_corrupt_state_is_rebuilt_from_the_parts(reference, tmp_path, caplog):
    src = reference["root"]
    ds = tmp_path / "ds"
    shutil.copytree(src / "ds", ds)
    state = ds / "_state" / "state.json"
    good = json.loads(state.read_text())
    # a flipped value that still parses: caught by the checksum
    sid = next(iter(good["sources"]))
    good["sources"][sid]["rows"] = 123456
    state.write_text(json.dumps(good))
    with caplog.at_level("WARNING", logger="fer_batch.incremental"):
        res = run_incremental(src / "inbox", ds, CFG)
    assert "corrupt state file" in caplog.text and "checksum" in caplog.text
    assert res.summary["reconcile"]["state"].startswith("corrupt")
    assert res.summary["nothing_to_do"] and res.summary["sources_decoded"] == 0
    # garbage bytes: same outcome; the rebuilt state is valid again
    state.write_bytes(b"\x00{not json")
    res = run_incremental(src / "inbox", ds, CFG)
    assert res.summary["nothing_to_do"] and res.summary["sources_decoded"] == 0
    State.from_bytes(state.read_bytes())
    # state gone entirely: rebuilt, nothing reprocessed
    state.unlink()
    res = run_incremental(src / "inbox", ds, CFG)
    assert res.summary["nothing_to_do"] and res.summary["reconcile"]["parts_read"] == N_VIDEOS + 1
    _check_exactly_once(ds, reference["counts"])


# --- lock, schema version, bad output ------------------------------------------------------------


def test_second_run_while_locked_exits_3(reference, tmp_path):
    ds = reference["root"] / "ds"
    with DatasetLock(ds):
        with pytest.raises(LockHeldError, match="holds the lock"):
            run_incremental(reference["root"] / "inbox", ds, CFG)
        t0 = time.perf_counter()
        r = subprocess.run([str(FER_BATCH), "process", str(reference["root"] / "inbox"), "--out", str(ds),
                            "--incremental", "--wait-lock", "1"], capture_output=True, text=True, timeout=120, env=_env())
        assert r.returncode == 3, r.stderr
        assert "holds the lock" in r.stderr and f"pid {os.getpid()}" in r.stderr and "after waiting 1 s" in r.stderr
        assert time.perf_counter() - t0 >= 1.0
    # released: the next run goes ahead
    assert run_incremental(reference["root"] / "inbox", ds, CFG).exit_code == 0


def test_two_runs_started_at_once_one_gets_exit_3(media, tmp_path):
    inbox = _inbox(media, tmp_path / "inbox", ["group.jpg"])
    ds = tmp_path / "ds"
    cmd = [str(FER_BATCH), "process", str(inbox), "--out", str(ds), "--incremental", "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env()) for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    errs = [p.stderr.read().decode() for p in procs]
    assert codes == [0, 3], errs
    assert any("another fer-batch run holds the lock" in e for e in errs)
    assert len(list(ds.glob("date=*/part-*.parquet"))) == 1


def test_other_schema_version_is_refused(reference, tmp_path):
    src = reference["root"]
    # a) the dataset marker says another version
    ds = tmp_path / "a"
    shutil.copytree(src / "ds", ds)
    (ds / "_state" / "dataset.json").write_text(json.dumps({"schema_version": "0.9"}))
    with pytest.raises(OutputError, match="schema version 0.9"):
        run_incremental(src / "inbox", ds, CFG)
    r = subprocess.run([str(FER_BATCH), "process", str(src / "inbox"), "--out", str(ds), "--incremental"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2 and "schema version 0.9" in r.stderr and "Not mixing" in r.stderr
    # b) no marker, no state, but a part of another version: refused, nothing written
    ds = tmp_path / "b"
    shutil.copytree(src / "ds", ds)
    shutil.rmtree(ds / "_state")
    part = next(ds.glob("date=*/part-*.parquet"))
    t = pq.read_table(part)
    meta = dict(t.schema.metadata)
    meta[META_SCHEMA_VERSION] = b"2.0"
    pq.write_table(t.replace_schema_metadata(meta), part)
    def listing():
        return sorted((str(p), p.stat().st_mtime_ns) for p in ds.rglob("*") if p.is_file() and p.name != ".lock")

    before = listing()
    with pytest.raises(OutputError, match=r"schema version\(s\) \['2.0'\]"):
        run_incremental(src / "inbox", ds, CFG)
    assert listing() == before  # nothing written, nothing removed


def test_bad_output_locations_are_clear_usage_errors(tmp_path, reference):
    inbox = str(reference["root"] / "inbox")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    not_a_dataset = tmp_path / "home"
    not_a_dataset.mkdir()
    (not_a_dataset / "thesis.docx").write_text("precious")
    cases = {
        str(a_file / "ds"): "cannot create the dataset directory",
        str(a_file): "is not a directory",
        str(tmp_path / "report.parquet"): "must name a directory",
        str(not_a_dataset): "not a fer-batch dataset directory",
    }
    for out, msg in cases.items():
        with pytest.raises(Exception, match=msg):
            IncrementalDataset(out).open()
    r = subprocess.run([str(FER_BATCH), "process", inbox, "--out", str(a_file / "ds"), "--incremental"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2 and "cannot create the dataset directory" in r.stderr
    assert sorted(p.name for p in not_a_dataset.iterdir()) == ["thesis.docx"]  # nothing written there


@pytest.mark.slow
def test_ray_runner_lands_the_same_rows(media, reference, tmp_path):
    """``--runner ray`` (an embedded local Ray, one worker): the same rows, one part per input,
    the Ray staging folder gone, and the next local run finds nothing to do."""
    pytest.importorskip("ray")
    inbox = _inbox(media, tmp_path / "inbox", ["clip5.mp4", "group.jpg"])
    ds = tmp_path / "ds"
    cfg = CFG.replace(ray={"num_workers": 1})
    cfg = RunConfig(**{**{f: getattr(cfg, f) for f in ("sampling", "detect", "track", "classify", "ray")}, "runner": "ray"})
    res = run_incremental(inbox, ds, cfg)
    assert res.exit_code == 0 and res.counts["new"] == 2, res.summary
    assert not (ds / "_staging").exists()
    _check_exactly_once(ds, {k: reference["counts"][k] for k in ("clip5.mp4", "group.jpg")})
    assert run_incremental(inbox, ds, CFG).summary["nothing_to_do"]  # the runner is not part of the fingerprint


def test_image_sequence_identity_covers_its_frames(media, tmp_path):
    """A folder read as one sequence is one input: a changed or added frame reprocesses it."""
    import cv2

    seq = tmp_path / "inbox" / "session1"
    seq.mkdir(parents=True)
    img = cv2.imread(str(media / "group.jpg"))
    for i in range(2):
        cv2.imwrite(str(seq / f"frame{i:03d}.png"), img)
    ds = tmp_path / "ds"
    cfg = CFG.replace(sampling={"images_as": "sequence"})
    res = run_incremental(tmp_path / "inbox", ds, cfg)
    assert res.counts["new"] == 1 and res.summary["rows_written"] == 12, res.summary
    assert run_incremental(tmp_path / "inbox", ds, cfg).summary["nothing_to_do"]
    cv2.imwrite(str(seq / "frame002.png"), img)  # one more frame
    res = run_incremental(tmp_path / "inbox", ds, cfg)
    assert res.counts["changed"] == 1 and res.summary["files_hashed"] == 1 and res.summary["rows_written"] == 18
    assert len(list(ds.glob("date=*/part-*.parquet"))) == 1 and read_dataset(ds).num_rows == 18
    # the same images as separate files are other inputs (the images_as option is fingerprinted)
    res = run_incremental(tmp_path / "inbox", ds, CFG)
    assert res.counts["new"] == 3


def _proc_wchar() -> int:
    """Bytes this process has passed to write(2) so far (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


@pytest.mark.slow
def test_ray_incremental_run_writes_each_row_once(media, reference, tmp_path, caplog):
    """An incremental run on Ray (videos split into segments) writes each row once: unit
    results come back through Ray's object store, the driver's sink writes one part per input,
    and no other file carrying rows exists at any point of the run (no staging copies).
    Measured: part bytes per row, and all bytes the driver wrote per row (state and summary
    JSON included)."""
    pytest.importorskip("ray")
    names = ["clip4.mp4", "clip5.mp4", "group.jpg"]
    inbox = _inbox(media, tmp_path / "inbox", names)
    ds = tmp_path / "ds"
    cfg = RunConfig(**{**{f: getattr(CFG, f) for f in ("sampling", "detect", "track", "classify")},
                       "ray": CFG.ray.__class__(num_workers=1), "plan": CFG.plan.__class__(segment_s=1.0),
                       "runner": "ray"})  # fmt: skip
    seen: dict[str, set] = {"extra": set(), "units": set()}

    def rows_files() -> set[str]:
        """Every file under tmp_path that could carry rows, other than the inputs."""
        return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "inbox" not in p.parts
                and p.suffix in (".parquet", ".tmp", ".arrow", ".feather")}  # fmt: skip

    def hook(step, payload):
        if step == "unit_done":
            seen["units"].add((payload["source"].path.name, payload["count"]))
        if step in ("unit_done", "source_done"):
            landed = {str(p.relative_to(tmp_path)) for p in ds.glob("date=*/part-*.parquet")}
            seen["extra"] |= rows_files() - landed

    w0 = _proc_wchar()
    res = run_incremental(inbox, ds, cfg, hook=hook)
    written = _proc_wchar() - w0
    assert res.exit_code == 0 and res.counts["new"] == 3, res.summary
    assert ("clip5.mp4", 2) in seen["units"], seen["units"]  # the videos ran as 2 segments each
    assert seen["extra"] == set(), f"row-carrying files besides the landed parts: {seen['extra']}"
    assert rows_files() == {str(p.relative_to(tmp_path)) for p in ds.glob("date=*/part-*.parquet")}
    _check_exactly_once(ds, {k: reference["counts"][k] for k in names})
    rows = res.summary["rows_written"]
    part_bytes = sum(p.stat().st_size for p in ds.glob("date=*/part-*.parquet"))
    assert rows > 0 and written >= part_bytes
    logging.getLogger(__name__).warning(
        "incremental Ray run: %d rows; parts %d B (%.1f B/row, written once); everything the driver wrote %d B "
        "(%.1f B/row incl. state and run summary)", rows, part_bytes, part_bytes / rows, written, written / rows)
