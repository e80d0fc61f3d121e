"""An incremental dataset opened under its lock: reconcile, plan the work, execute it.

See :mod:`fer_batch.incremental` for the design.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from fer_batch.version import __version__
from fer_batch.config import RunConfig
from fer_batch.device import resolve_device
from fer_batch.driver import execute
from fer_batch.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, ConfigError, FerBatchError, OutputError, Terminated
from fer_batch.incremental.sink import DatasetSink
from fer_batch.incremental.store import (
    CORRUPT_DIR,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    META_INCREMENTAL,
    PART_RE,
    PARTITION_RE,
    RUNS_DIR,
    STAGING_DIR,
    STATE_DIR,
    DatasetLock,
    Plan,
    SchemaMismatch,
    State,
    atomic_write_bytes,
    cached_hash,
    fsync_dir,
    model_fingerprint,
    new_run_id,
    run_fingerprint,
    source_files,
    WorkItem,
    CRASH_LIMIT,
    read_in_progress,
    write_in_progress,
)
from fer_batch.io import discover
from fer_batch.schema import SCHEMA_VERSION, SourceRow, read_metadata
from fer_batch.types import MediaSource

log = logging.getLogger(__name__)


@dataclass
class IncrementalResult:
    """The outcome of an incremental run; ``summary`` is what ``_runs/<run_id>.json`` holds."""

    run_id: str
    dataset: str
    summary: dict[str, Any]
    outcomes: list[dict]

    @property
    def exit_code(self) -> int:
        return int(self.summary["exit_code"])

    @property
    def counts(self) -> dict[str, int]:
        return self.summary["counts"]


class IncrementalDataset:
    """A dataset directory, opened under its lock and reconciled with the parts present.

    Use as a context manager::

        with IncrementalDataset(path, wait_lock=0).open() as ds:
            plan = ds.plan(inputs, cfg)
            result = ds.execute(plan, cfg, hook)
    """

    def __init__(self, root: str | os.PathLike, wait_lock: float = 0.0):
        root_s = str(root)
        if "://" in root_s:
            raise ConfigError(f"--incremental needs a local (or mounted) dataset directory, got {root_s!r}")
        if root_s.endswith(".parquet"):
            raise ConfigError(
                f"--incremental writes a dataset directory; --out must name a directory, not a .parquet file ({root_s})"
            )
        self.root = Path(root_s).expanduser().absolute()
        self.lock = DatasetLock(self.root, wait_lock)
        self.state = State()
        self.started = datetime.now(timezone.utc)
        self.run_id = new_run_id(self.started)
        self.reconcile_report: dict[str, Any] = {}
        # in-progress record (store.IN_PROGRESS): sources started and not landed, crash counts
        self.running: dict[str, dict] = {}
        self.deaths: dict[str, dict] = {}
        self.quarantined: dict[str, str] = {}  # source_id -> reason, recorded failed by this run
        self._t0 = time.perf_counter()

    # --- open / close ------------------------------------------------------------------------
    def open(self) -> "IncrementalDataset":
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"{self.root}: exists and is not a directory (--incremental needs a dataset directory)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.root}: cannot create the dataset directory: {e.strerror or e}") from e
        # Refuse a directory that is not a dataset before writing anything into it.
        unexpected = [
            p.name for p in self.root.iterdir()
            if not p.name.startswith((".", "_")) and not (p.is_dir() and PARTITION_RE.match(p.name))
        ]
        if unexpected:
            raise OutputError(
                f"{self.root}: not a fer-batch dataset directory (unexpected entries: {', '.join(sorted(unexpected)[:5])}); "
                "use an empty or new directory for --out with --incremental"
            )
        self.lock.acquire()
        try:
            for d in (STATE_DIR, RUNS_DIR):
                (self.root / d).mkdir(exist_ok=True)
            probe = self.root / STATE_DIR / f".probe.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            self.lock.release()
            raise OutputError(f"{self.root}: dataset directory is not writable: {e.strerror or e}") from e
        try:
            self._check_dataset_marker()
            self._reconcile()
        except BaseException:
            self.lock.release()
            raise
        return self

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "IncrementalDataset":
        return self.open() if self.lock.fd is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- schema version ----------------------------------------------------------------------
    def _check_dataset_marker(self) -> None:
        marker = self.root / STATE_DIR / "dataset.json"
        version = None
        if marker.is_file():
            try:
                version = str(json.loads(marker.read_text())["schema_version"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: unreadable (%s); checking the parts' schema version instead", marker, e)
            if version is not None and version != SCHEMA_VERSION:
                raise OutputError(
                    f"{self.root}: dataset written with schema version {version}; this fer-batch writes "
                    f"{SCHEMA_VERSION}. Not mixing them: use a new --out directory (or convert the old dataset)."
                )
        self._pending_marker = None
        if version is None:  # new dataset, or a lost marker: (re)write it once the parts are checked
            body = {"format": "fer-batch incremental dataset", "schema_version": SCHEMA_VERSION,
                    "created_by": f"fer-batch {__version__}", "created_at": self.started.isoformat(timespec="seconds")}
            self._pending_marker = (marker, json.dumps(body, indent=1).encode())

    # --- reconcile -----------------------------------------------------------------------------
    def _load_state(self) -> tuple[State, str | None]:
        path = self.root / STATE_DIR / "state.json"
        if not path.exists():
            return State(), "missing"
        try:
            return State.from_bytes(path.read_bytes()), None
        except SchemaMismatch as e:
            raise OutputError(
                f"{path}: state written with schema version {e}; this fer-batch writes {SCHEMA_VERSION}. "
                "Not mixing them: use a new --out directory."
            ) from None
        except (OSError, ValueError, UnicodeDecodeError, TypeError) as e:
            log.warning("%s: corrupt state file (%s); rebuilding the state from the dataset's parts", path, e)
            return State(), f"corrupt ({e})"

    def save_state(self) -> None:
        atomic_write_bytes(self.root / STATE_DIR / "state.json", self.state.to_bytes())

    def _reconcile(self) -> None:
        """Make the state agree with the part files present (the source of truth)."""
        state, problem = self._load_state()
        if (self.root / STAGING_DIR).exists():  # left by a Ray run that was killed: nothing landed from it
            shutil.rmtree(self.root / STAGING_DIR, ignore_errors=True)
            log.info("removed the staging folder of an interrupted Ray run")
        known = {s["part"]: (sid, s) for sid, s in state.sources.items() if "part" in s}
        report = {"state": problem or "ok", "temp_removed": 0, "superseded_removed": 0, "corrupt_moved": 0,
                  "parts": 0, "parts_read": 0, "parts_adopted": 0, "state_entries_dropped": 0}
        by_source: dict[str, list[dict]] = {}
        foreign: list[str] = []
        for pdir in sorted(p for p in self.root.iterdir() if p.is_dir() and PARTITION_RE.match(p.name)):
            for f in sorted(pdir.iterdir()):
                name = f.name
                if name.startswith(".") and name.endswith(".tmp"):
                    f.unlink(missing_ok=True)
                    report["temp_removed"] += 1
                    log.info("removed an unfinished temp file of an interrupted run: %s", f)
                    continue
                if name.startswith((".", "_")):
                    continue
                m = PART_RE.match(name)
                if not m:
                    log.warning("%s: not a fer-batch part file; readers of the dataset will see it too", f)
                    continue
                rel = f"{pdir.name}/{name}"
                report["parts"] += 1
                size = f.stat().st_size
                entry = None
                if rel in known and known[rel][1].get("part_size") == size:
                    entry = dict(known[rel][1], source_id=known[rel][0])
                else:
                    entry = self._read_part_entry(f, rel, size, foreign)
                    report["parts_read"] += 1
                    if entry is None:
                        report["corrupt_moved"] += 1
                        continue
                by_source.setdefault(entry["source_id"], []).append(entry)
        if foreign:
            raise OutputError(
                f"{self.root}: holds parts written with schema version(s) {sorted(set(foreign))}; this fer-batch writes "
                f"{SCHEMA_VERSION}. Not mixing them: use a new --out directory."
            )
        sources: dict[str, dict] = {}
        for sid, entries in by_source.items():
            entries.sort(key=lambda e: (e.get("written_ns", 0), e.get("run_id", "")))
            keep = entries[-1]
            for old in entries[:-1]:
                (self.root / old["part"]).unlink(missing_ok=True)
                report["superseded_removed"] += 1
                log.info("removed %s: superseded by %s (same source, newer)", old["part"], keep["part"])
            sources[sid] = {k: v for k, v in keep.items() if k not in ("source_id", "files")}
            if keep.get("files"):
                for fe in keep["files"]:  # seed the stat cache from the part (used after a rebuild)
                    c = state.files.get(fe["path"])
                    if not c or (c.get("size"), c.get("mtime_ns")) != (fe["size"], fe["mtime_ns"]):
                        state.files[fe["path"]] = {"size": fe["size"], "mtime_ns": fe["mtime_ns"], "b2": fe["b2"]}
        if problem is None:
            for sid, s in sources.items():
                if state.sources.get(sid, {}).get("part") != s["part"]:
                    report["parts_adopted"] += 1
                    log.info("the state lagged the dataset (an interrupted run): adopted %s", s["part"])
            for sid, s in state.sources.items():
                if sid not in sources:
                    report["state_entries_dropped"] += 1
                    log.warning("part %s of %s is gone; that input will be processed again", s.get("part"), s.get("path"))
        # Empty partitions (all parts superseded or removed) are removed too.
        for pdir in self.root.iterdir():
            if pdir.is_dir() and PARTITION_RE.match(pdir.name) and not any(pdir.iterdir()):
                pdir.rmdir()
        state.sources = sources
        self.state = state
        self.reconcile_report = report
        if self._pending_marker is not None:
            atomic_write_bytes(*self._pending_marker)
        self._account_deaths(state)
        if problem or any(report[k] for k in ("temp_removed", "superseded_removed", "corrupt_moved", "parts_read",
                                               "state_entries_dropped")):
            self.save_state()
            if problem and (problem != "missing" or report["parts"]):
                log.warning("state %s: rebuilt from %d part file(s) of the dataset", problem, report["parts"])
        fsync_dir(self.root)

    def save_in_progress(self) -> None:
        write_in_progress(self.root, self.running, self.deaths)

    def _account_deaths(self, state: State) -> None:
        """Sources still marked in progress were being processed when a run died (kill -9, an
        FFmpeg segfault, the OOM killer): count it; at ``CRASH_LIMIT`` runs record the source
        as failed, so one file that kills the process cannot stall every later run."""
        ip = read_in_progress(self.root)
        self.deaths = ip["deaths"]
        if not ip["running"]:
            return
        for sid, rec in ip["running"].items():
            before = self.deaths.get(sid)
            same = before and (before.get("content"), before.get("run_fp")) == (rec.get("content"), rec.get("run_fp"))
            count = (int(before.get("count", 0)) if same else 0) + 1
            if count >= CRASH_LIMIT:
                why = f"the process died while decoding this file in {count} runs"
                state.failed[sid] = {"path": rec.get("path"), "kind": rec.get("kind", "other"), "content": rec.get("content"),
                                     "run_fp": rec.get("run_fp"), "error": why, "run_id": self.run_id}
                self.deaths.pop(sid, None)
                self.quarantined[sid] = why
                log.error("%s: %s; recorded as failed (retried when it changes, or with --retry-failed)", rec.get("path"), why)
            else:
                self.deaths[sid] = {**rec, "count": count}
                log.warning("%s: a previous run died while processing it (%d of %d before it is recorded as failed)",
                            rec.get("path"), count, CRASH_LIMIT)
        self.reconcile_report["died_in_progress"] = sorted(ip["running"])
        if self.quarantined:
            self.save_state()
        self.save_in_progress()

    def _read_part_entry(self, f: Path, rel: str, size: int, foreign: list[str]) -> dict | None:
        try:
            schema = pq.read_schema(f)
        except (OSError, pa.ArrowException) as e:
            return self._quarantine(f, f"unreadable footer: {e}")
        meta = read_metadata(schema)
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            foreign.append(str(version))
            return None
        raw = (schema.metadata or {}).get(META_INCREMENTAL)
        try:
            inc = json.loads(raw) if raw else None
            sid = inc["source_id"]
        except (ValueError, KeyError, TypeError):
            return self._quarantine(f, "no fer-batch incremental metadata")
        m = PART_RE.match(f.name)
        if m and m.group("source_id") != sid:
            return self._quarantine(f, f"file name names source {m.group('source_id')}, metadata {sid}")
        return {
            "source_id": sid, "path": inc["source_path"], "kind": inc.get("kind"), "content": inc["content"],
            "run_fp": inc["run_fp"], "part": rel, "part_size": size, "rows": inc.get("rows"),
            "status": inc.get("status", "ok"), "run_id": inc["run_id"], "written_ns": inc["written_ns"],
            "files": inc.get("files", []),
        }

    def _quarantine(self, f: Path, why: str) -> None:
        dest_dir = self.root / CORRUPT_DIR
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / f"{f.parent.name}__{f.name}.corrupt"
        os.replace(f, dest)
        log.warning("%s: %s; moved to %s (its input will be processed again)", f, why, dest)
        return None

    # --- plan ------------------------------------------------------------------------------------
    def plan(self, inputs: Sequence[str | os.PathLike], cfg: RunConfig, retry_failed: bool = False) -> Plan:
        """Discover the inputs and decide, without decoding anything, what needs processing."""
        t0 = time.perf_counter()
        models = model_fingerprint(cfg, self.state.files)
        run_fp = run_fingerprint(models, cfg)
        sources, not_processed = discover([str(i) for i in inputs], cfg.sampling)
        outcomes: list[dict] = []
        for r in not_processed:
            status = r.get("status", "skipped")
            outcomes.append({"path": r.get("path"), "source_id": r.get("source_id"), "outcome": status,
                             "status": status, "error": r.get("error"), "row": dict(r)})
        work: list[WorkItem] = []
        hashed = 0
        seen: set[str] = set()
        for src in sources:
            if src.source_id in seen:
                continue
            seen.add(src.source_id)
            files: list[dict] = []
            try:
                for p in source_files(src):
                    st = p.stat()
                    before = self.state.files.get(str(p))
                    fresh = not (before and (before.get("size"), before.get("mtime_ns")) == (st.st_size, st.st_mtime_ns)
                                 and "b2" in before)
                    h = cached_hash(p, self.state.files)
                    hashed += int(fresh)
                    files.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "b2": h})
            except OSError as e:
                why = f"cannot read: {e.strerror or e}"
                outcomes.append({"path": str(src.path), "source_id": src.source_id, "outcome": "failed",
                                 "status": "failed", "error": why, "row": SourceRow.failed(src, why).to_dict()})
                continue
            content = files[0]["b2"] if len(files) == 1 and src.kind != "image_sequence" else _combine(src, files)
            prev = self.state.sources.get(src.source_id)
            fail = self.state.failed.get(src.source_id)
            if prev and prev["content"] == content and prev["run_fp"] == run_fp and not (
                fail and fail.get("content") == content and fail.get("run_fp") == run_fp
            ):
                outcomes.append({"path": str(src.path), "source_id": src.source_id, "outcome": "unchanged",
                                 "status": prev.get("status", "ok"), "rows": prev.get("rows"), "part": prev["part"]})
                continue
            if src.source_id in self.quarantined and not retry_failed:  # recorded failed by this run
                why = self.quarantined[src.source_id]
                outcomes.append({"path": str(src.path), "source_id": src.source_id, "outcome": "failed",
                                 "status": "failed", "error": why, "row": SourceRow.failed(src, why).to_dict()})
                continue
            if fail and fail.get("content") == content and fail.get("run_fp") == run_fp and not retry_failed:
                outcomes.append({"path": str(src.path), "source_id": src.source_id, "outcome": "unchanged",
                                 "status": "failed", "error": fail.get("error"),
                                 "note": "failed in run " + str(fail.get("run_id")) + "; retried when it changes"})
                continue
            if prev is None and fail is None:
                outcome, reason = "new", "new input"
            elif (prev or fail)["content"] != content:
                outcome, reason = "changed", "content changed"
            elif (prev or fail)["run_fp"] != run_fp:
                outcome, reason = "changed", "models or configuration changed"
            else:
                outcome, reason = "changed", "retrying a failed input"
            work.append(WorkItem(src, outcome, reason, content, files))
        # Forget cached stats of files no longer among the inputs (model files are kept).
        listed = {str(p) for src in sources for p in source_files(src)}
        self.state.files = {k: v for k, v in self.state.files.items() if k in listed or "sha256" in v}
        return Plan(self.run_id, run_fp, models, work, outcomes, hashed, time.perf_counter() - t0)

    # --- execute -----------------------------------------------------------------------------------
    def execute(self, plan: Plan, cfg: RunConfig, hook=None) -> IncrementalResult:
        """Process the plan's work items (any runner), one part per source, and write the run summary.

        The rows go from the runner straight into the dataset (one part per source, written
        once, by :class:`~fer_batch.incremental.sink.DatasetSink`).
        """
        sink = DatasetSink(self, plan, cfg)
        device = None
        error: str | None = None
        error_code: int | None = None
        try:
            if plan.work:
                device = resolve_device(cfg.classify.device)
                execute([w.source for w in plan.work], cfg, device, sink, hook)
        except FerBatchError as e:
            error, error_code = str(e), EXIT_USAGE
            raise
        except KeyboardInterrupt:
            error, error_code = "interrupted", EXIT_INTERRUPTED
            raise
        except Terminated:
            error, error_code = "terminated (SIGTERM)", EXIT_TERMINATED
            raise
        except BaseException as e:
            error, error_code = f"{type(e).__name__}: {e}", EXIT_INTERNAL
            raise
        finally:
            try:
                if self.running:  # this process stops on its own (error, Ctrl-C, SIGTERM): no crash to count
                    self.running.clear()
                    self.save_in_progress()
                self.save_state()
                result = self._summarise(plan, list(plan.outcomes) + sink.outcomes, sink.models, device, sink.decoded,
                                         sink.rows_written, sink.parts_removed, error, error_code)
            except (OSError, FerBatchError) as e:
                if error is None:
                    raise
                log.error("could not record the state / run summary after the error above: %s", e)
        return result

    def _summarise(self, plan, outcomes, models_info, device, decoded, rows_written, parts_removed, error,
                   error_code) -> IncrementalResult:
        counts = {k: 0 for k in ("new", "changed", "unchanged", "failed", "partial", "skipped")}
        for o in outcomes:
            if o["outcome"] in counts:
                counts[o["outcome"]] += 1
            if o.get("status") == "partial" and o["outcome"] != "unchanged":
                counts["partial"] += 1
        counts["failed_before_unchanged"] = sum(1 for o in outcomes if o["outcome"] == "unchanged" and o["status"] == "failed")
        if error_code is not None:
            exit_code = error_code
        else:
            exit_code = EXIT_FAILED if counts["failed"] else EXIT_OK
        finished = datetime.now(timezone.utc)
        summary = {
            "run_id": plan.run_id,
            "dataset": str(self.root),
            "started_at": self.started.isoformat(timespec="milliseconds"),
            "finished_at": finished.isoformat(timespec="milliseconds"),
            "wall_s": round(time.perf_counter() - self._t0, 3),
            "exit_code": exit_code,
            "error": error,
            "nothing_to_do": not plan.work and error is None,
            "counts": counts,
            "sources_decoded": decoded,
            "files_hashed": plan.hashed_files,
            "models_loaded": bool(models_info),
            "rows_written": rows_written,
            "parts_removed": parts_removed,
            "reconcile": self.reconcile_report,
            "schema_version": SCHEMA_VERSION,
            "fer_batch_version": __version__,
            "run_fingerprint": plan.run_fp,
            "models": plan.models,
            "models_info": models_info,
            "device": device,
            "inputs": [{k: v for k, v in o.items() if k != "_removed"} for o in outcomes],
        }
        data = json.dumps(summary, indent=1, default=str).encode()
        atomic_write_bytes(self.root / RUNS_DIR / f"{plan.run_id}.json", data)
        atomic_write_bytes(self.root / RUNS_DIR / "latest.json", data)
        return IncrementalResult(plan.run_id, str(self.root), summary, outcomes)


def _combine(src: MediaSource, files: list[dict]) -> str:
    base = Path(src.path)
    h = hashlib.blake2b(digest_size=20)
    for fe in files:
        p = Path(fe["path"])
        name = str(p.relative_to(base)) if p.is_relative_to(base) else str(p)
        h.update(f"{name}\0{fe['b2']}\n".encode())
    return "b2:" + h.hexdigest()
