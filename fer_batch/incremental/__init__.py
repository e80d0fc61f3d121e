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

import json
import os
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from fer_batch.config import RunConfig
from fer_batch.incremental.dataset import IncrementalDataset, IncrementalResult, Plan, WorkItem
from fer_batch.incremental.store import (
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    META_INCREMENTAL,
    PART_RE,
    PARTITION_RE,
    RUNS_DIR,
    STATE_DIR,
    DatasetLock,
    LockHeldError,
    SchemaMismatch,
    State,
    hash_file,
    model_fingerprint,
    run_fingerprint,
)
from fer_batch.schema import FACES_SCHEMA, SOURCES_SCHEMA, SourceRow, rows_to_table


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
    root = Path(dataset)
    if not any(p.is_dir() and PARTITION_RE.match(p.name) for p in root.iterdir()):
        return FACES_SCHEMA.empty_table()
    return pads.dataset(str(root), format="parquet", partitioning="hive").to_table(columns=columns)


def sources_table(dataset: str | os.PathLike) -> pa.Table:
    """The sources table (``SOURCES_SCHEMA``) of a dataset: one row per input it holds rows
    for (from each part's metadata), plus the inputs recorded as failed in the state.

    Read-only and lock-free: a report can call it while a run is going on.
    """
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
                rows[sid] = SourceRow.not_processed(sid, fail["path"], fail.get("kind", "other"), "failed",
                                                    fail.get("error") or "failed").to_dict()
    except (OSError, ValueError, SchemaMismatch):
        pass
    return rows_to_table(sorted(rows.values(), key=lambda r: r["path"]), SOURCES_SCHEMA)


__all__ = [
    "run_incremental", "read_dataset", "sources_table", "IncrementalDataset", "IncrementalResult", "DatasetLock",
    "LockHeldError", "State", "Plan", "WorkItem", "model_fingerprint", "run_fingerprint", "hash_file",
    "META_INCREMENTAL", "RUNS_DIR", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_LOCKED",
]  # fmt: skip
