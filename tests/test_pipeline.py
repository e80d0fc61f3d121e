"""Unit tests of pipeline helpers: decode-ahead prefetching and per-track smoothing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fer_batch.errors import DecodeError
from fer_batch.pipeline import prefetch, smooth_probs


def test_prefetch_keeps_order_and_bounds_lookahead():
    produced = []

    def gen():
        for i in range(20):
            produced.append(i)
            yield i

    it = prefetch(gen(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(produced) <= 1 + 2 + 1  # consumed + queued + one waiting to be queued
    assert list(it) == list(range(1, 20))


def test_prefetch_reraises_after_earlier_items():
    def gen():
        yield 1
        yield 2
        raise DecodeError("x.mp4: broken at frame 3")

    got = []
    with pytest.raises(DecodeError, match="frame 3"):
        for v in prefetch(gen()):
            got.append(v)
    assert got == [1, 2]


def test_prefetch_close_stops_the_thread():
    def gen():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    it = prefetch(gen(), depth=2)
    assert next(it) == 0
    it.close()
    assert threading.active_count() == before


def test_smooth_probs_per_track_time_window():
    t = np.array([0.0, 0.5, 1.0, 1.5, 0.0, 10.0])
    tid = np.array([0, 0, 0, 0, 1, 1])
    p = np.zeros((6, 7), np.float32)
    p[[0, 2], 3] = 1.0  # happy
    p[[1, 3], 6] = 1.0  # neutral
    p[4, 0] = 1.0
    p[5, 4] = 1.0
    s = smooth_probs(tid, t, p, window_s=1.0)  # +-0.5 s
    np.testing.assert_allclose(s.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(s[0, [3, 6]], [0.5, 0.5])  # t=0 sees t=0, 0.5
    np.testing.assert_allclose(s[1, [3, 6]], [2 / 3, 1 / 3])  # t=0.5 sees 0, 0.5, 1.0
    np.testing.assert_allclose(s[4], p[4])  # other track, 10 s apart: untouched
    np.testing.assert_allclose(s[5], p[5])
