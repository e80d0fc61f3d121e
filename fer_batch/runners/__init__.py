"""Executors of a plan's units: ``local`` (in-process) and ``ray`` (the only module importing ray).

Every runner has the same shape: a context manager that loads the models (or starts its
workers) on enter, exposes ``models`` (names and sha256 of the models it runs) once started,
and whose ``run(units, hook)`` yields one :class:`~fer_batch.plan.UnitResult` per unit, in
any order, never raising for a bad input (a unit that cannot be processed yields a
``failed`` result). Writing is not a runner's business: the driver hands the results to a sink.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Protocol

from fer_batch.config import RunConfig
from fer_batch.pipeline import Hook
from fer_batch.plan import UnitResult, WorkUnit
from fer_batch.runners.local import LocalRunner


class Runner(Protocol):
    """What the driver needs from a runner."""

    models: dict[str, Any]

    def __enter__(self) -> "Runner": ...

    def __exit__(self, *exc: Any) -> None: ...

    def run(self, units: Iterable[WorkUnit], hook: Hook | None = None) -> Iterator[UnitResult]: ...


def make_runner(cfg: RunConfig, device: str, *, may_split: bool = True, n_sources: int = 1) -> Runner:
    """The runner ``cfg.runner`` names, not started yet."""
    if cfg.runner == "ray":
        # Imported here, not at the top, so that local runs never pay for importing Ray.
        from fer_batch.runners.ray import RayRunner

        return RayRunner(cfg, device, may_split=may_split, n_sources=n_sources)
    return LocalRunner(cfg, device)


__all__ = ["Runner", "LocalRunner", "make_runner"]
