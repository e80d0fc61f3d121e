"""Which frames of a source are analysed: a pure function of the frame timestamps.

The plan is computed once per source from the timestamps of *all* frames (decord indexes
them up front at almost no cost), so a time segment of a long video samples exactly the
frames that an unsegmented run would: concatenating the plans of adjacent segments gives the
plan of the whole source.
"""

from __future__ import annotations

import math

import numpy as np

from fer_batch.config import SamplingConfig

# Timestamps are compared with this slack (seconds). decord stores them as float32, so a
# frame that starts exactly on a grid time may read as 0.49999997 s; 0.1 ms is far below any
# real frame duration and far above float32 rounding for videos up to about a day long.
TIME_EPS = 1e-4


def sample_indices(
    timestamps: np.ndarray,
    sampling: SamplingConfig,
    segment: tuple[float, float] | None = None,
) -> np.ndarray:
    """Frame indices to decode, in increasing order.

    Args:
        timestamps: presentation time (s) of every frame of the source, in frame order.
        sampling: the rule. ``every`` (if set) takes every N-th frame counted from the first
            frame at or after ``start_s``; otherwise ``fps`` takes, for each grid time
            ``start_s + k / fps``, the first frame whose timestamp is at or after it (a frame
            is taken at most once, so on variable-frame-rate footage a long frame does not
            repeat); ``fps=None`` and ``every=None`` take every frame. ``start_s <= t < end_s``
            bounds the window and ``max_frames`` caps the count.
        segment: ``(t0, t1)``: keep only planned frames with ``t0 <= t < t1``. The grid, the
            ``every`` phase and ``max_frames`` are global, so segments concatenate exactly.

    Returns:
        int64 array of 0-based frame indices.
    """
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    n = len(ts)
    if n == 0:
        return np.zeros(0, np.int64)
    end = math.inf if sampling.end_s is None else float(sampling.end_s)
    start = float(sampling.start_s)
    in_window = (ts >= start - TIME_EPS) & (ts < end - TIME_EPS)
    window = np.flatnonzero(in_window)
    if len(window) == 0:
        return np.zeros(0, np.int64)

    if sampling.every is not None:
        picked = window[:: int(sampling.every)]
    elif sampling.fps is None:
        picked = window
    else:
        picked = _grid_pick(ts, window, start, float(sampling.fps))

    if sampling.max_frames is not None:
        picked = picked[: int(sampling.max_frames)]
    if segment is not None:
        t0, t1 = float(segment[0]), float(segment[1])
        seg_ts = ts[picked]
        picked = picked[(seg_ts >= t0 - TIME_EPS) & (seg_ts < t1 - TIME_EPS)]
    return picked.astype(np.int64)


def _grid_pick(ts: np.ndarray, window: np.ndarray, start: float, fps: float) -> np.ndarray:
    """For each grid time ``start + k / fps``, the first frame at or after it (no repeats).

    Greedy rule, vectorised: with ``g`` the next grid time not yet served, a frame at grid
    position ``r`` is taken when ``r >= g`` and then ``g = floor(r) + 1``. Since timestamps
    increase, ``g`` always equals ``floor(r_prev) + 1``, so a frame is taken exactly when
    ``floor(r)`` moved past the previous frame's (the first frame of the window always is).
    """
    cell = np.floor((ts[window] - start) * fps + TIME_EPS * fps)
    picked = np.ones(len(window), dtype=bool)
    picked[1:] = cell[1:] > cell[:-1]
    return window[picked]
