"""The in-process runner: the units of a plan one after another through the same stage objects."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

from fer_batch.config import RunConfig
from fer_batch.pipeline import Hook, Stages, process_source
from fer_batch.plan import UnitResult, WorkUnit, own_frame_count

log = logging.getLogger(__name__)


class LocalRunner:
    """Runs units in this process, in order; models are loaded once on ``__enter__``.

    A unit whose processing raises becomes a ``failed`` result: one source's error never
    stops the run.
    """

    def __init__(self, cfg: RunConfig, device: str):
        self.cfg = cfg
        self.device = device
        self.stages: Stages | None = None
        self.models: dict[str, Any] = {}

    def __enter__(self) -> "LocalRunner":
        self.stages = Stages(self.cfg, self.device).setup()
        self.stages.use_reid  # noqa: B018 - raises now (not once per source) when --reid on cannot work
        self.models = self.stages.models_info()
        return self

    def __exit__(self, *exc) -> None:
        if self.stages is not None:
            self.stages.teardown()
            self.stages = None

    def run(self, units: Iterable[WorkUnit], hook: Hook | None = None) -> Iterator[UnitResult]:
        """Yield each unit's result as soon as it is ready."""
        if self.stages is None:
            raise RuntimeError("LocalRunner.run outside its with-block")
        for unit in units:
            try:
                res = process_source(unit.source, self.stages, self.cfg, hook=hook, segment=unit.read)
            except Exception as e:  # noqa: BLE001 - one bad item must never stop the batch
                log.exception("%s: failed", unit.source.path)
                yield UnitResult.failed(unit, f"{type(e).__name__}: {e}")
                continue
            yield UnitResult(unit, res.row, own_frame_count(unit, res.frame_times), res.faces)


__all__ = ["LocalRunner"]
