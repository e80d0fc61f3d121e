"""The Python API, mirroring ``fer-batch process``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from fer_batch import __version__
from fer_batch.config import OPTIONS, RunConfig, config_from_options
from fer_batch.errors import ConfigError
from fer_batch.pipeline import Hook, SourceResult, Stages
from fer_batch.schema import FACES_SCHEMA, SOURCES_SCHEMA, TRACKS_SCHEMA, rows_to_table, tracks_table

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
    """Process inputs; write ``out`` (+ ``.sources`` / ``.tracks`` beside it) when given."""
    from fer_batch.device import resolve_device
    from fer_batch.io import discover
    from fer_batch.output import RunOutputs, check_writable

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
    rows: list[dict] = list(not_processed)
    kept: list[pa.Table] = []

    if cfg.runner == "ray":
        from fer_batch.runners.ray import run_ray

        return run_ray(sources, not_processed, out_s, cfg, device, hook=hook, t0=t0)

    stages = Stages(cfg, device).setup()
    models = stages.models_info()
    outputs = RunOutputs(out_s, __version__, models, cfg.to_dict()) if out_s else None

    def on_result(res: SourceResult) -> None:
        rows.append(res.row)
        if outputs is not None:
            outputs.add_faces(res.faces)
        else:
            kept.append(res.faces)

    from fer_batch.runners.local import run_local

    try:
        run_local(sources, stages, cfg, on_result, hook=hook)
    except BaseException:
        if outputs is not None:
            # Keep what is done: finish the files with the sources completed so far.
            log.warning("interrupted: writing the %d sources completed so far", len(rows) - len(not_processed))
            outputs.finish(rows)
        raise
    finally:
        stages.teardown()
    if outputs is not None:
        outputs.finish(rows)
        faces = None
    else:
        faces = pa.concat_tables(kept) if kept else FACES_SCHEMA.empty_table()
    return ProcessResult(
        sources=rows_to_table(rows, SOURCES_SCHEMA), out=out_s, models=models, config=cfg,
        wall_s=time.perf_counter() - t0, _faces=faces,
    )


def process(inputs, out=None, **options) -> pa.Table:
    """Process videos / images and return the faces table (one row per face per frame).

    Options are those of ``fer-batch process`` with underscores (``fps=2``, ``det_size=1024``,
    ``images_as="sequence"``...). With ``out``, the three Parquet files are written too.
    """
    return run(inputs, out=out, **options).faces


__all__ = ["process", "run", "ProcessResult", "config_from_options", "TRACKS_SCHEMA"]
