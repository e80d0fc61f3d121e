"""The in-process runner: one source after another through the same stage objects."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from fer_batch.config import RunConfig
from fer_batch.pipeline import Hook, SourceResult, Stages, process_source
from fer_batch.types import MediaSource

log = logging.getLogger(__name__)


def run_local(
    sources: Iterable[MediaSource],
    stages: Stages,
    cfg: RunConfig,
    on_result: Callable[[SourceResult], None],
    hook: Hook | None = None,
) -> None:
    """Process ``sources`` in order; hand each result to ``on_result`` as soon as it is ready."""
    stages.setup()
    for src in sources:
        on_result(process_source(src, stages, cfg, hook=hook))
