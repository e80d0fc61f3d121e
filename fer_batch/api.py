"""The Python API, mirroring ``fer-batch process``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from fer_batch.config import OPTIONS, RunConfig, config_from_options
from fer_batch.device import resolve_device
from fer_batch.driver import execute
from fer_batch.errors import ConfigError
from fer_batch.io import discover
from fer_batch.output import check_writable
from fer_batch.pipeline import Hook
from fer_batch.schema import TRACKS_SCHEMA, SourceRow, tracks_table
from fer_batch.sink import TableSink

log = logging.getLogger(__name__)


@dataclass
class ProcessResult:
    """The outcome of a run. Tables are read back from the written files when ``out`` was given."""

    sources: pa.Table
    out: str | None
    models: dict[str, Any]
    config: RunConfig
    wall_s: float
    _faces: pa.Table | None = field(default=None, repr=False)

    @property
    def faces(self) -> pa.Table:
        if self._faces is None:
            self._faces = pq.read_table(self.out)
        return self._faces

    @property
    def tracks(self) -> pa.Table:
        return tracks_table(self.faces)

    @property
    def exit_code(self) -> int:
        """0 when every input is ok, partial or skipped; 1 when any input failed."""
        return 1 if "failed" in self.sources.column("status").to_pylist() else 0


def run(
    inputs: Sequence[str | Path] | str | Path,
    out: str | Path | None = None,
    cfg: RunConfig | None = None,
    hook: Hook | None = None,
    **options: Any,
) -> ProcessResult:
    """Process inputs; write ``out`` (+ ``.sources`` / ``.tracks`` beside it) when given.

    Options are those of ``fer-batch process`` with underscores (see ``config.OPTIONS``), or
    a whole ``cfg``. Hook steps: ``run_start``, the pipeline's (``source_start``, ``frame``...),
    ``unit_done``, ``source_done``, and the Ray runner's (``ray_start``, ``worker_ready``...).
    """
    t0 = time.perf_counter()
    if cfg is not None and options:
        raise ConfigError("pass either cfg or keyword options, not both")
    cfg = cfg or config_from_options(**options)
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out_s = str(out) if out is not None else None
    if out_s is not None:
        check_writable(out_s)
    device = resolve_device(cfg.classify.device)
    sources, not_processed = discover(list(inputs), cfg.sampling)
    if hook is not None:
        hook("run_start", {"sources": len(sources)})
    sink = TableSink(out_s, [SourceRow.from_dict(r) for r in not_processed], cfg)
    models = execute(sources, cfg, device, sink, hook)
    return ProcessResult(
        sources=sink.sources_table(), out=out_s, models=models, config=cfg,
        wall_s=time.perf_counter() - t0, _faces=sink.faces_table(),
    )  # fmt: skip


def process(inputs, out=None, **options) -> pa.Table:
    """Process videos / images and return the faces table (one row per face per frame).

    Options are those of ``fer-batch process`` with underscores (``fps=2``, ``det_size=1024``,
    ``images_as="sequence"``...). With ``out``, the three Parquet files are written too.
    """
    return run(inputs, out=out, **options).faces


__all__ = ["process", "run", "ProcessResult", "config_from_options", "OPTIONS", "TRACKS_SCHEMA"]
