"""The local runner: the units of a plan one after another, in a worker process or in-process.

By default (``--source-timeout`` auto or seconds) the units run in one worker process
(:mod:`fer_batch.runners.worker`) that loads the models once; a unit that passes its time
limit, or whose worker dies under it (a decoder crash, an out-of-memory kill), is ``failed``
and the next unit gets a fresh worker. With ``--source-timeout off`` the units run in this
process, with no limit (no start-up cost; a hang or crash in a decoder is then the run's).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

from fer_batch.config import RunConfig
from fer_batch.pipeline import Hook, Stages, process_source
from fer_batch.plan import UnitResult, WorkUnit, own_frame_count
from fer_batch.runners.support import no_hook
from fer_batch.runners.worker import WorkerProcess

log = logging.getLogger(__name__)


class LocalRunner:
    """Runs units in order, on this machine; models are loaded once on ``__enter__``.

    A unit whose processing raises, times out or kills its worker becomes a ``failed``
    result: one source's error never stops the run.
    """

    def __init__(self, cfg: RunConfig, device: str):
        self.cfg = cfg
        self.device = device
        self.stages: Stages | None = None
        self.worker: WorkerProcess | None = None
        self.models: dict[str, Any] = {}
        self._entered = False

    def __enter__(self) -> "LocalRunner":
        if self.cfg.isolated:
            self.worker = WorkerProcess(self.cfg, self.device).start()
            self.models = self.worker.models
        else:
            self.stages = Stages(self.cfg, self.device).setup()
            self.stages.use_reid  # noqa: B018 - raises now (not once per source) when --reid on cannot work
            self.models = self.stages.models_info()
        self._entered = True
        return self

    def __exit__(self, *exc) -> None:
        self._entered = False
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.stages is not None:
            self.stages.teardown()
            self.stages = None

    def run(self, units: Iterable[WorkUnit], hook: Hook | None = None) -> Iterator[UnitResult]:
        """Yield each unit's result as soon as it is ready."""
        if not self._entered:
            raise RuntimeError("LocalRunner.run outside its with-block")
        hook = hook or no_hook
        for unit in units:
            if self.cfg.isolated:
                yield self._run_isolated(unit, hook)
                continue
            try:
                res = process_source(unit.source, self.stages, self.cfg, hook=hook, segment=unit.read)
            except Exception as e:  # noqa: BLE001 - one bad item must never stop the batch
                log.exception("%s: failed", unit.source.path)
                yield UnitResult.failed(unit, f"{type(e).__name__}: {e}")
                continue
            yield UnitResult(unit, res.row, own_frame_count(unit, res.frame_times), res.faces)

    def _run_isolated(self, unit: WorkUnit, hook: Hook) -> UnitResult:
        if self.worker is None or not self.worker.alive:
            if self.worker is not None:
                self.worker.kill()
            self.worker = WorkerProcess(self.cfg, self.device).start()  # a fresh one after a timeout or crash
        result, usable = self.worker.run(unit, hook)
        if not usable:
            self.worker.kill()
            self.worker = None
        return result


__all__ = ["LocalRunner"]
