"""Issue 11 items 2, 3, 11: errors that are not the media's, stopping (SIGTERM, kill -9), exit codes.

Real parts only: generated videos, real model sessions, real subprocesses of ``fer-batch``.
"""

from __future__ import annotations

import numpy as np
import pytest

from fer_batch.classify import EmotionClassifier
from fer_batch.config import RunConfig, config_from_options
from fer_batch.pipeline import Stages, process_source
from fer_batch.types import MediaSource


class _FailingSession(EmotionClassifier):
    """The real classifier whose ONNX Runtime session really fails from its second batch on:
    it is handed an input of the wrong rank, as a broken provider or model would fail."""

    calls = 0

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        type(self).calls += 1  # batches
        return super().__call__(crops)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if type(self).calls >= 2:
            x = x[:, 0]  # wrong rank: onnxruntime raises (InvalidArgument)
        return super()._run(x)


def _source(path) -> MediaSource:
    from fer_batch.io import discover

    sources, _ = discover([str(path)], RunConfig().sampling)
    return sources[0]


def test_a_runtime_error_after_the_first_frames_is_failed_not_partial(sample_video):
    """Item 3: only a decoder that breaks off is ``partial``; an ONNX Runtime error after the
    first frames makes the source ``failed`` with the error's type, and it keeps no rows."""
    cfg = config_from_options(batch_size=2, reid="off", fps=4.0, max_frames=4)
    stages = Stages(cfg).setup()
    stages.classifier.__class__ = _FailingSession
    _FailingSession.calls = 0
    try:
        res = process_source(_source(sample_video.path), stages, cfg)
    finally:
        stages.teardown()
    assert _FailingSession.calls >= 2  # the error came after a first good batch
    assert res.row.status == "failed", res.row
    assert res.row.error and ("Fail" in res.row.error or "InvalidArgument" in res.row.error), res.row.error
    assert res.faces.num_rows == 0
    assert res.row.frames_sampled > 0
