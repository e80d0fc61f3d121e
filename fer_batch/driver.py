"""The one run path: plan -> runner -> merge -> sink, for every runner and every output.

``execute`` plans the sources' units (:mod:`fer_batch.plan`), lets a runner produce their
results (:mod:`fer_batch.runners`), merges each source's results in input order, and hands
them to a sink (:mod:`fer_batch.sink`). The plain run (``fer_batch.api.run``) and the
incremental run (``fer_batch.incremental``) both call it; only their sinks differ.
"""

from __future__ import annotations

import logging

from fer_batch.config import RunConfig
from fer_batch.pipeline import Hook
from fer_batch.plan import Assembler, Plan, merge_source
from fer_batch.runners import make_runner
from fer_batch.sink import Sink
from fer_batch.types import MediaSource

log = logging.getLogger(__name__)


def _no_hook(step: str, payload: dict) -> None:
    return None


def execute(sources: list[MediaSource], cfg: RunConfig, device: str, sink: Sink, hook: Hook | None = None) -> dict:
    """Process ``sources`` with ``cfg.runner`` into ``sink``; return the models used.

    Hook steps added here: ``unit_done`` (each unit, in completion order) and ``source_done``
    (each source once merged, in input order). On any exception (including Ctrl-C) the sink
    is told ``interrupted()`` and the exception propagates.
    """
    hook = hook or _no_hook
    plan = Plan(sources, cfg, on_source_start=sink.source_started)
    assembler = Assembler(plan)
    runner = make_runner(cfg, device, may_split=plan.may_split, n_sources=len(sources))
    try:
        with runner:
            for result in runner.run(plan.units(), hook):
                u = result.unit
                hook("unit_done", {"source": u.source, "index": u.index, "count": u.count, "status": result.row.status,
                                   "rows": result.table().num_rows,
                                   "node_id": result.info.get("node_id"), "pid": result.info.get("pid")})  # fmt: skip
                assembler.add(result)
                for src, results in assembler.ready():
                    sink.open(runner.models)
                    row, tracks = merge_source(src, results, cfg, lambda t, s=src: sink.faces(s, t))
                    sink.source_done(src, row, tracks)
                    hook("source_done", {"source": src, "row": row})
            sink.open(runner.models)
    except BaseException:
        if runner.models:  # the run had started: keep what is done
            sink.open(runner.models)
            sink.interrupted()
        raise
    sink.close()
    return dict(runner.models)


__all__ = ["execute"]
