"""Where a run's results go: one sink interface for every runner and every kind of output.

The driver (:func:`fer_batch.driver.execute`) hands a sink each source's merged rows in input
order, whichever runner produced them:

* ``source_started(source)`` as the source's first unit goes to a runner;
* ``faces(source, table)`` one or more times (a split source comes in time order);
* ``source_done(source, row, tracks)`` once all of the source's rows were given;
* ``close()`` at the end of a run, or ``interrupted()`` when it stops early (then re-raised).

:class:`TableSink` writes the three Parquet files of a plain run (or keeps the tables in
memory); the incremental dataset's sink is ``fer_batch.incremental.sink.DatasetSink``.
Rows are written once, by the sink, in the driver's process.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import pyarrow as pa

from fer_batch.version import __version__
from fer_batch.config import RunConfig
from fer_batch.output import RunOutputs
from fer_batch.schema import FACES_SCHEMA, SourceRow, sources_to_table
from fer_batch.types import MediaSource

log = logging.getLogger(__name__)


class Sink(Protocol):
    """What the driver writes to (see the module docstring for the order of calls)."""

    def open(self, models: dict[str, Any]) -> None: ...

    def source_started(self, source: MediaSource) -> None: ...

    def faces(self, source: MediaSource, table: pa.Table) -> None: ...

    def source_done(self, source: MediaSource, row: SourceRow, tracks: pa.Table) -> None: ...

    def close(self) -> None: ...

    def interrupted(self) -> None: ...


class TableSink:
    """The faces, sources and tracks tables of a plain run: three Parquet files, or memory.

    Args:
        out: ``report.parquet`` path or URI (``.sources`` / ``.tracks`` are written beside
            it), or ``None`` to keep the tables in memory.
        not_processed: rows of the inputs that were skipped or failed before processing.
        cfg: recorded in the files' metadata.
    """

    def __init__(self, out: str | None, not_processed: list[SourceRow], cfg: RunConfig):
        self.out = out
        self.cfg = cfg
        self.rows: list[SourceRow] = list(not_processed)
        self.models: dict[str, Any] = {}
        self.completed = 0
        self._outputs: RunOutputs | None = None
        self._kept: list[pa.Table] = []
        self._opened = False

    def open(self, models: dict[str, Any]) -> None:
        if self._opened:
            return
        self.models = dict(models)
        if self.out is not None and self._outputs is None:  # (a signal may have interrupted a first call)
            self._outputs = RunOutputs(self.out, __version__, self.models, self.cfg.to_dict())
        self._opened = True

    def source_started(self, source: MediaSource) -> None:
        return None

    def faces(self, source: MediaSource, table: pa.Table) -> None:
        if self._outputs is not None:
            self._outputs.write_faces(table)
        elif table.num_rows:
            self._kept.append(table)

    def source_done(self, source: MediaSource, row: SourceRow, tracks: pa.Table) -> None:
        self.rows.append(row)
        self.completed += 1
        if self._outputs is not None:
            self._outputs.add_tracks(tracks)

    def close(self) -> None:
        self.open(self.models)
        if self._outputs is not None:
            self._outputs.finish([r.to_dict() for r in self.rows])

    def interrupted(self) -> None:
        """Keep what is done: finish the files with the sources completed so far."""
        if self._outputs is None:
            return
        log.warning("interrupted: writing the %d sources completed so far (marked complete: false)", self.completed)
        try:
            self._outputs.finish([r.to_dict() for r in self.rows], complete=False)
        except Exception:  # noqa: BLE001 - keep the original error
            log.exception("could not finish the outputs of the interrupted run")
            self._outputs.abort()

    def sources_table(self) -> pa.Table:
        return sources_to_table(self.rows)

    def faces_table(self) -> pa.Table | None:
        """The faces kept in memory (``None`` when they were written to ``out``)."""
        if self.out is not None:
            return None
        return pa.concat_tables(self._kept) if self._kept else FACES_SCHEMA.empty_table()


__all__ = ["Sink", "TableSink"]
