"""The incremental dataset's storage: layout, file helpers, fingerprints, state file and lock.

See :mod:`fer_batch.incremental` for the design (exactly once, reconciliation).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fer_batch.version import __version__
from fer_batch.config import RunConfig
from fer_batch.errors import ModelError, OutputError
from fer_batch.models import registry, sha256_file
from fer_batch.schema import SCHEMA_VERSION
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


# In-progress record (issue 11 item 2): the sources a run has started and not landed, and how
# many runs died while each was in progress. A source in progress when CRASH_LIMIT runs died is
# recorded as failed (and skipped until it changes or --retry-failed).
IN_PROGRESS = "in_progress.json"
CRASH_LIMIT = 2


def read_in_progress(root: Path) -> dict[str, dict]:
    """``{"running": {source_id: record}, "deaths": {source_id: record + count}}`` (empty if
    missing or unreadable: losing it only forgets crash counts)."""
    try:
        raw = json.loads((Path(root) / STATE_DIR / IN_PROGRESS).read_bytes())
        if isinstance(raw, dict) and all(isinstance(raw.get(k), dict) for k in ("running", "deaths")):
            return {"running": raw["running"], "deaths": raw["deaths"]}
    except (OSError, ValueError):
        pass
    return {"running": {}, "deaths": {}}


def write_in_progress(root: Path, running: dict[str, dict], deaths: dict[str, dict]) -> None:
    atomic_write_bytes(Path(root) / STATE_DIR / IN_PROGRESS,
                       json.dumps({"running": running, "deaths": deaths}, indent=1, sort_keys=True).encode())


class LockHeldError(OutputError):
    """Another run holds the dataset's lock (exit code 3)."""


# --------------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------------


def fsync_dir(d: Path) -> None:
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


def atomic_write(path: Path, write) -> None:
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
    except BaseException:  # SIGTERM (Terminated), Ctrl-C, an encoder error: no temp file left
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def canonical(obj: Any) -> bytes:
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
        files[p.name] = cached_hash(p, file_cache, algo="sha256")
    if not files:
        raise ModelError(f"pack directory {d} has no .onnx files")
    return {"name": d.name, "files": files}


def cached_hash(p: Path, cache: dict[str, dict], algo: str = "b2") -> str:
    """Hash of ``p``, reusing ``cache[path]`` when size and mtime_ns still match."""
    st = p.stat()
    key = str(p)
    c = cache.get(key)
    if c and c.get("size") == st.st_size and c.get("mtime_ns") == st.st_mtime_ns and algo in c:
        return c[algo]
    if algo == "sha256":
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
    cache = file_cache if file_cache is not None else {}
    reg = registry(cfg.models_dir)
    pack = cfg.detect.pack
    if pack and Path(pack).expanduser().is_dir():
        det = _pack_dir_entry(Path(pack).expanduser().resolve(), cache)
    else:
        det = _card_entry(reg.resolve(pack, "face_detection"))
    cls = _card_entry(reg.resolve(cfg.classify.model, "emotion_classification"))
    out = {"detector": det, "classifier": cls}
    # re-identification changes track ids: the default pack's face embedding counts when it is
    # used (reid not off, and no user pack that brings its own recognition model, hashed above)
    if cfg.track.reid != "off" and not (pack and Path(pack).expanduser().is_dir()):
        emb = [c for c in reg.cards("face_embedding") if c.default]
        if emb:
            out["embedder"] = _card_entry(emb[0])
    return out


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
    return "b2:" + hashlib.blake2b(canonical(body), digest_size=20).hexdigest()


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
        checksum = hashlib.blake2b(canonical(body), digest_size=16).hexdigest()
        return json.dumps({**body, "checksum": checksum}, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "State":
        """Parse and verify; raise ValueError when the file is corrupt in any way."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        checksum = raw.pop("checksum", None)
        if checksum != hashlib.blake2b(canonical(raw), digest_size=16).hexdigest():
            raise ValueError("checksum mismatch")
        if raw.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown state format {raw.get('format')!r}")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise SchemaMismatch(str(raw.get("schema_version")))
        parts = [raw.get(k) for k in ("sources", "failed", "files")]
        if not all(isinstance(p, dict) for p in parts):
            raise ValueError("missing sections")
        return cls(*parts)


class SchemaMismatch(Exception):
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
