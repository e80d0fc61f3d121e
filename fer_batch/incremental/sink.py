"""The incremental run's sink: each source's rows land in the dataset as one part, written once.

Called by the driver (:func:`fer_batch.driver.execute`) in input order, whichever runner
produced the rows. A source's part is written atomically (temp file, fsync, rename), then its
older part is removed, then the state is saved: see :mod:`fer_batch.incremental`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fer_batch.version import __version__
from fer_batch.config import RunConfig
from fer_batch.incremental.store import META_INCREMENTAL, Plan, WorkItem, atomic_write, canonical, fsync_dir
from fer_batch.schema import FACES_SCHEMA, SourceRow, with_metadata
from fer_batch.types import MediaSource

log = logging.getLogger(__name__)


class DatasetSink:
    """Lands each processed source of an incremental run's plan in the dataset.

    ``outcomes`` (one per source, for the run summary), ``decoded``, ``rows_written`` and
    ``parts_removed`` are filled in as sources land.
    """

    def __init__(self, ds: Any, plan: Plan, cfg: RunConfig):
        """``ds``: the open :class:`~fer_batch.incremental.dataset.IncrementalDataset` (its
        ``root``, ``state``, ``started`` and ``save_state``)."""
        self.ds = ds
        self.plan = plan
        self.cfg = cfg
        self.items: dict[str, WorkItem] = {w.source.source_id: w for w in plan.work}
        self.models: dict[str, Any] = {}
        self.outcomes: list[dict] = []
        self.decoded = 0
        self.rows_written = 0
        self.parts_removed = 0
        self._faces: list[pa.Table] = []

    def open(self, models: dict[str, Any]) -> None:
        self.models = self.models or dict(models)

    def source_started(self, source: MediaSource) -> None:
        """Record (durably) that ``source`` is in progress, before any of it is probed or
        decoded: if the process dies now, the next run knows which input it was on."""
        item = self.items[source.source_id]
        self.ds.running[source.source_id] = {
            "path": str(source.path), "kind": source.kind, "content": item.content, "run_fp": self.plan.run_fp,
            "run_id": self.plan.run_id, "pid": os.getpid(), "started_ns": time.time_ns(),
        }
        self.ds.save_in_progress()

    def faces(self, source: MediaSource, table: pa.Table) -> None:
        if table.num_rows:
            self._faces.append(table)

    def source_done(self, source: MediaSource, row: SourceRow, tracks: pa.Table) -> None:
        faces = pa.concat_tables(self._faces) if self._faces else FACES_SCHEMA.empty_table()
        self._faces = []
        self.decoded += 1
        o = self._land(self.items[source.source_id], faces, row)
        # landed (or its failure recorded): no longer in progress, and its crash count is over
        self.ds.running.pop(source.source_id, None)
        self.ds.deaths.pop(source.source_id, None)
        self.ds.save_in_progress()
        self.rows_written += o.get("rows", 0) if o["outcome"] != "failed" else 0
        self.parts_removed += o.pop("_removed", 0)
        self.outcomes.append(o)
        log_outcome(o)

    def close(self) -> None:
        return None

    def interrupted(self) -> None:
        self._faces = []  # a source not landed is redone by the next run

    def _land(self, item: WorkItem, faces: pa.Table, source_row: SourceRow) -> dict:
        """Write one source's part (or record its failure) and update the state."""
        plan, cfg, models_info = self.plan, self.cfg, self.models
        src, row = item.source, source_row.to_dict()
        sid = src.source_id
        base = {"path": str(src.path), "source_id": sid, "outcome": item.outcome, "reason": item.reason,
                "status": row["status"], "error": row.get("error"), "row": row}
        if row["status"] == "failed":
            self.ds.state.failed[sid] = {"path": str(src.path), "kind": src.kind, "content": item.content, "run_fp": plan.run_fp,
                                      "error": row.get("error"), "run_id": plan.run_id}
            self.ds.save_state()
            return {**base, "outcome": "failed", "was": item.outcome, "rows": 0}
        written_ns = time.time_ns()
        rel = f"date={self.ds.started.strftime('%Y-%m-%d')}/part-{plan.run_id}-{sid}.parquet"
        inc = {
            "source_id": sid, "source_path": str(src.path), "kind": src.kind, "content": item.content,
            "files": item.files, "run_fp": plan.run_fp, "run_id": plan.run_id, "written_ns": written_ns,
            "status": row["status"], "rows": faces.num_rows, "row": row,
        }
        table = with_metadata(faces, version=__version__, models=models_info, config=cfg.to_dict())
        meta = dict(table.schema.metadata)
        meta[META_INCREMENTAL] = canonical(inc)
        table = table.replace_schema_metadata(meta)
        final = self.ds.root / rel
        if not final.parent.exists():
            final.parent.mkdir()
            fsync_dir(self.ds.root)  # the new partition's entry must survive a power loss too
        atomic_write(final, lambda f: pq.write_table(table, f, compression="zstd"))
        # The new rows have landed: now remove the source's older part(s).
        removed = 0
        prev = self.ds.state.sources.get(sid)
        if prev and prev.get("part") and prev["part"] != rel:
            old = self.ds.root / prev["part"]
            if old.exists():
                old.unlink()
                removed += 1
                fsync_dir(old.parent)
                if not any(old.parent.iterdir()):
                    old.parent.rmdir()
        self.ds.state.sources[sid] = {
            "path": str(src.path), "kind": src.kind, "content": item.content, "run_fp": plan.run_fp, "part": rel,
            "part_size": final.stat().st_size, "rows": faces.num_rows, "status": row["status"],
            "run_id": plan.run_id, "written_ns": written_ns,
        }
        self.ds.state.failed.pop(sid, None)
        self.ds.save_state()
        return {**base, "rows": faces.num_rows, "part": rel, "rows_removed": prev.get("rows") if removed else 0,
                "_removed": removed}



def log_outcome(o: dict) -> None:
    if o["outcome"] == "failed":
        log.warning("failed    %s: %s", o["path"], o.get("error"))
    else:
        log.info("%-9s %s: %s, %s rows -> %s", o["outcome"], o["path"], o["status"], o.get("rows"), o.get("part"))


__all__ = ["DatasetSink", "log_outcome"]
