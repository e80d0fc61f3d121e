"""Incremental, exactly-once runs into a hive-partitioned Parquet dataset (scheduled jobs).

``fer-batch process INBOX/ --out DATASET/ --incremental`` processes only the inputs that are
new or changed since the last run and appends their rows to::

    DATASET/
      date=YYYY-MM-DD/part-<run_id>-<source_id>.parquet   one file per source: its rows (may be 0)
      _state/dataset.json       schema version of the dataset (written once)
      _state/state.json         cache: file stats + content hashes, sources, failures (checksummed)
      _runs/<run_id>.json       machine-readable summary of each run (+ _runs/latest.json)
      _corrupt/                 unreadable part files moved aside (never deleted)
      .lock                     flock(2) held by the running run
      date=.../.part-*.tmp      a part being written (removed on the next start if orphaned)

``pyarrow.dataset.dataset(DATASET, partitioning="hive")`` and ``pandas.read_parquet(DATASET)``
read the rows and nothing else (they skip names starting with ``_`` and ``.``); with duckdb
read ``DATASET/date=*/*.parquet`` with ``hive_partitioning=true``. No ``*.parquet`` file lives
outside the partitions, so ``DATASET/**/*.parquet`` works too.

Exactly-once design: the part files are the source of truth. Each part's key-value metadata
carries its source id, path, the content fingerprint of its files (size, mtime_ns, blake2b),
the run fingerprint (models + row-changing configuration), the run id and write time. A part
is written to a hidden temp name, fsynced, renamed into place (the directory fsynced), then
the source's older parts are deleted, then the state file is updated. A run killed at any
moment leaves one of: an orphan temp file (removed, source redone), two parts for one source
(the newest complete one is kept), or a state that lags the parts (rebuilt from the parts'
metadata). Every start reconciles the state with the parts present before planning, so every
input's rows are present exactly once after the next run.

Identity of an input: its path (the source id is a hash of it), its files' size and
``mtime_ns`` and a content hash. Hashing is lazy: a file whose size and mtime_ns match the
state is not read at all; otherwise it is hashed (blake2b, streamed), and if the hash matches
(a ``touch``) the input still counts as unchanged. A change of model (name or sha256 in its
card) or of any configuration that changes rows (sampling, detection, tracking, classification
options; not the device, batch size or runner) reprocesses every input.

Inputs that disappear from the inbox keep their rows. Failed inputs are recorded in the state
and retried only when they change (or with ``retry_failed``), so a permanently broken file
does not fail every scheduled run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from fer_batch import __version__
from fer_batch.config import RunConfig
from fer_batch.errors import ConfigError, FerBatchError, ModelError, OutputError
from fer_batch.schema import FACES_SCHEMA, SCHEMA_VERSION, read_metadata, with_metadata
from fer_batch.types import MediaSource

log = logging.getLogger(__name__)

STATE_DIR = "_state"
RUNS_DIR = "_runs"
CORRUPT_DIR = "_corrupt"
STAGING_DIR = "_staging"  # the Ray runner's intermediate files during a run
LOCK_NAME = ".lock"
STATE_FORMAT = 1
META_INCREMENTAL = b"fer_batch.incremental"
PART_RE = re.compile(r"^part-(?P<run_id>\d{8}T\d{12}Z-[0-9a-f]{6})-(?P<source_id>[A-Za-z0-9_.-]+)\.parquet$")
PARTITION_RE = re.compile(r"^date=\d{4}-\d{2}-\d{2}$")

# Exit codes for schedulers (the same as plain ``process``, plus 3).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3

# Configuration fields that do not change rows: left out of the run fingerprint.
_NOT_ROW_CHANGING = {
    "detect": {"pack"},  # the pack is fingerprinted by its files' sha256 instead of its path
    "classify": {"model", "batch_size", "device"},  # the model by its card; the rest does not change rows
}
_FINGERPRINT_SECTIONS = ("sampling", "detect", "track", "classify")


class LockHeldError(OutputError):
    """Another run holds the dataset's lock (exit code 3)."""


# --------------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------------


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a hidden temp file beside ``path``, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write: {e}") from e
    _fsync_dir(path.parent)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Content hash of a file (blake2b-160, streamed), as ``"b2:<hex>"``."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return "b2:" + h.hexdigest()


def new_run_id(now: datetime | None = None) -> str:
    """Sortable, unique run id: UTC time to the microsecond plus 6 random hex digits."""
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------


def _card_entry(card) -> dict[str, Any]:
    entry = {"name": card.name, "sha256": card.sha256}
    if card.card_path is not None and Path(card.card_path).is_file():
        # Preprocessing and labels live in the card: a changed card changes rows too.
        entry["card_sha256"] = hashlib.sha256(Path(card.card_path).read_bytes()).hexdigest()
    return entry


def _pack_dir_entry(d: Path, file_cache: dict[str, dict]) -> dict[str, Any]:
    files = {}
    for p in sorted(d.glob("*.onnx")):
        files[p.name] = _cached_hash(p, file_cache, algo="sha256")
    if not files:
        raise ModelError(f"pack directory {d} has no .onnx files")
    return {"name": d.name, "files": files}


def _cached_hash(p: Path, cache: dict[str, dict], algo: str = "b2") -> str:
    """Hash of ``p``, reusing ``cache[path]`` when size and mtime_ns still match."""
    st = p.stat()
    key = str(p)
    c = cache.get(key)
    if c and c.get("size") == st.st_size and c.get("mtime_ns") == st.st_mtime_ns and algo in c:
        return c[algo]
    if algo == "sha256":
        from fer_batch.models import sha256_file

        value = sha256_file(p)
    else:
        value = hash_file(p)
    entry = dict(c) if c and c.get("size") == st.st_size and c.get("mtime_ns") == st.st_mtime_ns else {}
    entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    entry[algo] = value
    cache[key] = entry
    return value


def model_fingerprint(cfg: RunConfig, file_cache: dict[str, dict] | None = None) -> dict[str, Any]:
    """Names and sha256 of the models a run would use, resolved exactly as the stages do,
    without loading them (cards are read; a user pack directory's .onnx files are hashed,
    with the hashes cached by size and mtime_ns).
    """
    from fer_batch.models import registry

    cache = file_cache if file_cache is not None else {}
    reg = registry(cfg.models_dir)
    pack = cfg.detect.pack
    if pack and Path(pack).expanduser().is_dir():
        det = _pack_dir_entry(Path(pack).expanduser().resolve(), cache)
    else:
        det = _card_entry(reg.resolve(pack, "face_detection"))
    cls = _card_entry(reg.resolve(cfg.classify.model, "emotion_classification"))
    return {"detector": det, "classifier": cls}


def row_config(cfg: RunConfig) -> dict[str, Any]:
    """The part of the configuration that changes rows (what the run fingerprint covers)."""
    d = cfg.to_dict()
    out = {}
    for sec in _FINGERPRINT_SECTIONS:
        out[sec] = {k: v for k, v in d[sec].items() if k not in _NOT_ROW_CHANGING.get(sec, set())}
    return out


def run_fingerprint(models: dict[str, Any], cfg: RunConfig) -> str:
    """Hash of schema version + models + row-changing configuration."""
    body = {"schema_version": SCHEMA_VERSION, "models": models, "config": row_config(cfg)}
    return "b2:" + hashlib.blake2b(_canonical(body), digest_size=20).hexdigest()


def source_files(source: MediaSource) -> list[Path]:
    """The files whose content defines a source (an image sequence: its frames in order)."""
    if source.kind == "image_sequence":
        return [Path(p) for p in source.frames]
    return [Path(source.path)]


# --------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------


@dataclass
class State:
    """What the dataset holds, as a cache of the parts' metadata plus failure records.

    ``sources[source_id]``: path, kind, content, run_fp, part (relative path), part_size,
    rows, status, run_id, written_ns. ``failed[source_id]``: path, content, run_fp, error,
    run_id. ``files[path]``: size, mtime_ns, b2 (and sha256 for model files).
    """

    sources: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, dict] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        body = {
            "format": STATE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "fer_batch_version": __version__,
            "sources": self.sources,
            "failed": self.failed,
            "files": self.files,
        }
        checksum = hashlib.blake2b(_canonical(body), digest_size=16).hexdigest()
        return json.dumps({**body, "checksum": checksum}, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "State":
        """Parse and verify; raise ValueError when the file is corrupt in any way."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        checksum = raw.pop("checksum", None)
        if checksum != hashlib.blake2b(_canonical(raw), digest_size=16).hexdigest():
            raise ValueError("checksum mismatch")
        if raw.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown state format {raw.get('format')!r}")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise _SchemaMismatch(str(raw.get("schema_version")))
        parts = [raw.get(k) for k in ("sources", "failed", "files")]
        if not all(isinstance(p, dict) for p in parts):
            raise ValueError("missing sections")
        return cls(*parts)


class _SchemaMismatch(Exception):
    pass


# --------------------------------------------------------------------------------------------
# lock
# --------------------------------------------------------------------------------------------


class DatasetLock:
    """An exclusive ``flock`` on ``DATASET/.lock``; released by the kernel if the process dies.

    Args:
        root: the dataset directory.
        wait_s: how long to wait for another run to finish (0: fail at once).
    """

    def __init__(self, root: Path, wait_s: float = 0.0):
        self.path = Path(root) / LOCK_NAME
        self.wait_s = max(0.0, float(wait_s))
        self.fd: int | None = None

    def acquire(self) -> "DatasetLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{self.path.parent}: dataset directory is not writable ({e.strerror})") from e
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise OutputError(f"{self.path}: cannot lock: {e}") from e
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    waited = f" after waiting {self.wait_s:g} s" if self.wait_s else ""
                    raise LockHeldError(
                        f"{self.path.parent}: another fer-batch run holds the lock{waited}"
                        f"{f' ({holder})' if holder else ''}; nothing was done (exit code 3)"
                    ) from None
                time.sleep(min(0.25, max(0.01, deadline - time.monotonic())))
        info = f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "DatasetLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------


@dataclass
class WorkItem:
    source: MediaSource
    outcome: str  # new | changed
    reason: str
    content: str
    files: list[dict]


@dataclass
class Plan:
    """What a run will do: work items, and the inputs it leaves alone."""

    run_id: str
    run_fp: str
    models: dict[str, Any]
    work: list[WorkItem]
    outcomes: list[dict]  # one per input not in ``work`` (unchanged, failed before, skipped, ...)
    hashed_files: int
    discover_s: float


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
        except _SchemaMismatch as e:
            raise OutputError(
                f"{path}: state written with schema version {e}; this fer-batch writes {SCHEMA_VERSION}. "
                "Not mixing them: use a new --out directory."
            ) from None
        except (OSError, ValueError, UnicodeDecodeError, TypeError) as e:
            log.warning("%s: corrupt state file (%s); rebuilding the state from the dataset's parts", path, e)
            return State(), f"corrupt ({e})"

    def _save_state(self) -> None:
        _atomic_write_bytes(self.root / STATE_DIR / "state.json", self.state.to_bytes())

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
            _atomic_write_bytes(*self._pending_marker)
        if problem or any(report[k] for k in ("temp_removed", "superseded_removed", "corrupt_moved", "parts_read",
                                               "state_entries_dropped")):
            self._save_state()
            if problem and (problem != "missing" or report["parts"]):
                log.warning("state %s: rebuilt from %d part file(s) of the dataset", problem, report["parts"])
        _fsync_dir(self.root)

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
        from fer_batch.io import discover

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
                    h = _cached_hash(p, self.state.files)
                    hashed += int(fresh)
                    files.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "b2": h})
            except OSError as e:
                outcomes.append({"path": str(src.path), "source_id": src.source_id, "outcome": "failed",
                                 "status": "failed", "error": f"cannot read: {e.strerror or e}",
                                 "row": _failed_row(src, f"cannot read: {e.strerror or e}")})
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
        """Process the plan's work items, one part per source, and write the run summary."""
        outcomes = list(plan.outcomes)
        models_info: dict[str, Any] = {}
        device = None
        error: str | None = None
        error_code: int | None = None
        decoded = 0
        rows_written = 0
        parts_removed = 0
        try:
            if plan.work:
                results, models_info, device = self._results(plan, cfg, hook)
                for item, res in results:
                    decoded += 1
                    o = self._land(item, res, plan, cfg, models_info)
                    rows_written += o.get("rows", 0) if o["outcome"] != "failed" else 0
                    parts_removed += o.pop("_removed", 0)
                    outcomes.append(o)
                    _log_outcome(o)
        except FerBatchError as e:
            error, error_code = str(e), EXIT_USAGE
            raise
        except KeyboardInterrupt:
            error, error_code = "interrupted", 130
            raise
        except BaseException as e:
            error, error_code = f"{type(e).__name__}: {e}", EXIT_FAILED
            raise
        finally:
            try:
                self._save_state()
                result = self._summarise(plan, outcomes, models_info, device, decoded, rows_written, parts_removed,
                                         error, error_code)
            except (OSError, FerBatchError) as e:
                if error is None:
                    raise
                log.error("could not record the state / run summary after the error above: %s", e)
        return result

    def _results(self, plan: Plan, cfg: RunConfig, hook) -> tuple[Iterator, dict, str]:
        """Load the models (only now that there is work) and yield (item, SourceResult) pairs."""
        from fer_batch.device import resolve_device
        from fer_batch.pipeline import Stages, process_source

        device = resolve_device(cfg.classify.device)
        if cfg.runner == "ray":
            return self._ray_results(plan, cfg, device, hook)
        stages = Stages(cfg, device).setup()
        models_info = stages.models_info()

        def gen():
            try:
                for item in plan.work:
                    yield item, process_source(item.source, stages, cfg, hook=hook)
            finally:
                stages.teardown()

        return gen(), models_info, device

    def _ray_results(self, plan: Plan, cfg: RunConfig, device: str, hook) -> tuple[Iterator, dict, str]:
        """Run the work on Ray (``run_ray`` into ``_staging/<run_id>/``), then land per source.

        The Ray runner writes one faces file for the whole run; the parts land after it
        returns. A Ray run killed midway lands nothing and its inputs are redone next time
        (exactly once still holds: nothing landed twice).
        """
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        from fer_batch.pipeline import SourceResult
        from fer_batch.runners.ray import run_ray

        staging = self.root / STAGING_DIR / plan.run_id
        staging.mkdir(parents=True, exist_ok=True)
        out = staging / "faces.parquet"
        result = run_ray([w.source for w in plan.work], [], str(out), cfg, device, hook=hook)
        rows = {r["source_id"]: r for r in result.sources.to_pylist()}
        faces = pads.dataset(str(out), format="parquet")

        def gen():
            try:
                for item in plan.work:
                    sid = item.source.source_id
                    table = faces.to_table(filter=pc.field("source_id") == sid).cast(FACES_SCHEMA)
                    row = rows.get(sid) or _failed_row(item.source, "the Ray runner returned no result")
                    yield item, SourceResult(table, row)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                with contextlib.suppress(OSError):
                    staging.parent.rmdir()  # only when empty

        return gen(), result.models, device

    def _land(self, item: WorkItem, res, plan: Plan, cfg: RunConfig, models_info: dict) -> dict:
        """Write one source's part (or record its failure) and update the state."""
        src, row = item.source, dict(res.row)
        sid = src.source_id
        base = {"path": str(src.path), "source_id": sid, "outcome": item.outcome, "reason": item.reason,
                "status": row["status"], "error": row.get("error"), "row": row}
        if row["status"] == "failed":
            self.state.failed[sid] = {"path": str(src.path), "kind": src.kind, "content": item.content, "run_fp": plan.run_fp,
                                      "error": row.get("error"), "run_id": plan.run_id}
            self._save_state()
            return {**base, "outcome": "failed", "was": item.outcome, "rows": 0}
        written_ns = time.time_ns()
        rel = f"date={self.started.strftime('%Y-%m-%d')}/part-{plan.run_id}-{sid}.parquet"
        inc = {
            "source_id": sid, "source_path": str(src.path), "kind": src.kind, "content": item.content,
            "files": item.files, "run_fp": plan.run_fp, "run_id": plan.run_id, "written_ns": written_ns,
            "status": row["status"], "rows": res.faces.num_rows, "row": row,
        }
        table = with_metadata(res.faces, version=__version__, models=models_info, config=cfg.to_dict())
        meta = dict(table.schema.metadata)
        meta[META_INCREMENTAL] = _canonical(inc)
        table = table.replace_schema_metadata(meta)
        final = self.root / rel
        if not final.parent.exists():
            final.parent.mkdir()
            _fsync_dir(self.root)  # the new partition's entry must survive a power loss too
        _atomic_write(final, lambda f: pq.write_table(table, f, compression="zstd"))
        # The new rows have landed: now remove the source's older part(s).
        removed = 0
        prev = self.state.sources.get(sid)
        if prev and prev.get("part") and prev["part"] != rel:
            old = self.root / prev["part"]
            if old.exists():
                old.unlink()
                removed += 1
                _fsync_dir(old.parent)
                if not any(old.parent.iterdir()):
                    old.parent.rmdir()
        self.state.sources[sid] = {
            "path": str(src.path), "kind": src.kind, "content": item.content, "run_fp": plan.run_fp, "part": rel,
            "part_size": final.stat().st_size, "rows": res.faces.num_rows, "status": row["status"],
            "run_id": plan.run_id, "written_ns": written_ns,
        }
        self.state.failed.pop(sid, None)
        self._save_state()
        return {**base, "rows": res.faces.num_rows, "part": rel, "rows_removed": prev.get("rows") if removed else 0,
                "_removed": removed}

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
        _atomic_write_bytes(self.root / RUNS_DIR / f"{plan.run_id}.json", data)
        _atomic_write_bytes(self.root / RUNS_DIR / "latest.json", data)
        return IncrementalResult(plan.run_id, str(self.root), summary, outcomes)


def _combine(src: MediaSource, files: list[dict]) -> str:
    base = Path(src.path)
    h = hashlib.blake2b(digest_size=20)
    for fe in files:
        p = Path(fe["path"])
        name = str(p.relative_to(base)) if p.is_relative_to(base) else str(p)
        h.update(f"{name}\0{fe['b2']}\n".encode())
    return "b2:" + h.hexdigest()


def _failed_row(src: MediaSource, error: str) -> dict:
    return {"source_id": src.source_id, "path": str(src.path), "kind": src.kind, "status": "failed", "error": error,
            "duration_s": None, "frames_sampled": 0, "faces": 0, "tracks": 0, "wall_s": 0.0}


def _log_outcome(o: dict) -> None:
    if o["outcome"] == "failed":
        log.warning("failed    %s: %s", o["path"], o.get("error"))
    else:
        log.info("%-9s %s: %s, %s rows -> %s", o["outcome"], o["path"], o["status"], o.get("rows"), o.get("part"))


def run_incremental(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    dataset: str | os.PathLike,
    cfg: RunConfig | None = None,
    hook=None,
    wait_lock: float = 0.0,
    retry_failed: bool = False,
) -> IncrementalResult:
    """Process only new or changed inputs into ``dataset`` (see the module docstring).

    Raises:
        LockHeldError: another run holds the lock (exit code 3).
        OutputError: the dataset cannot be written or holds another schema version (exit 2).
    """
    cfg = cfg or RunConfig()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    with IncrementalDataset(dataset, wait_lock=wait_lock) as ds:
        plan = ds.plan(inputs, cfg, retry_failed=retry_failed)
        return ds.execute(plan, cfg, hook=hook)


def read_dataset(dataset: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """All rows of a dataset as one table (with the ``date`` partition column)."""
    import pyarrow.dataset as ds

    root = Path(dataset)
    if not any(p.is_dir() and PARTITION_RE.match(p.name) for p in root.iterdir()):
        return FACES_SCHEMA.empty_table()
    return ds.dataset(str(root), format="parquet", partitioning="hive").to_table(columns=columns)


def sources_table(dataset: str | os.PathLike) -> pa.Table:
    """The sources table (``SOURCES_SCHEMA``) of a dataset: one row per input it holds rows
    for (from each part's metadata), plus the inputs recorded as failed in the state.

    Read-only and lock-free: a report can call it while a run is going on.
    """
    from fer_batch.schema import SOURCES_SCHEMA, rows_to_table

    root = Path(dataset)
    rows: dict[str, dict] = {}
    newest: dict[str, tuple] = {}
    for f in sorted(root.glob("date=*/part-*.parquet")):
        if not PARTITION_RE.match(f.parent.name) or not PART_RE.match(f.name):
            continue
        try:
            inc = json.loads((pq.read_schema(f).metadata or {})[META_INCREMENTAL])
        except (OSError, pa.ArrowException, KeyError, ValueError):
            continue
        key = (inc.get("written_ns", 0), inc.get("run_id", ""))
        if inc["source_id"] not in newest or key > newest[inc["source_id"]]:
            newest[inc["source_id"]] = key
            rows[inc["source_id"]] = inc["row"]
    try:
        state = State.from_bytes((root / STATE_DIR / "state.json").read_bytes())
        for sid, fail in state.failed.items():
            if sid not in rows:
                rows[sid] = {"source_id": sid, "path": fail["path"], "kind": fail.get("kind", "other"), "status": "failed",
                             "error": fail.get("error"), "frames_sampled": 0, "faces": 0, "tracks": 0, "wall_s": 0.0}
    except (OSError, ValueError, _SchemaMismatch):
        pass
    return rows_to_table(sorted(rows.values(), key=lambda r: r["path"]), SOURCES_SCHEMA)


__all__ = [
    "run_incremental", "read_dataset", "sources_table", "IncrementalDataset", "IncrementalResult", "DatasetLock",
    "LockHeldError", "model_fingerprint", "run_fingerprint", "hash_file",
    "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_LOCKED",
]
