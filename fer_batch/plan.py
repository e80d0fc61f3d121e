"""The plan of a run: which units of work exist, and how their results become one source again.

No runner and no Ray here: the local runner and the Ray runner both execute the units planned
here, and the driver merges their results with the same code, so splitting and stitching are
tested without Ray.

* A unit is a whole source, or one time segment of a long video / image sequence
  (``RunConfig.segment_s``). A segment also decodes a short overlap before its start (at
  least ``PlanConfig.overlap_frames`` sampled frames and at least ``TrackConfig.lost_s``
  seconds), so its fresh tracker already follows every face alive at the border.
* A source is only split when its reader can start mid-way cheaply (trusted container
  seeking and a keyframe index): otherwise each segment would decode from the start and the
  work would grow with the square of the length (MPEG-TS, MPEG-PS, WMV, FLV...).
* Merging a split source: track ids are stitched across borders (tracks matched by box IoU
  on the overlap frames, which both segments analysed), each row is kept once (a segment
  owns the frames ``own_start <= t < own_end``; its overlap rows are dropped), and temporal
  smoothing is recomputed over the borders. Memory is bounded by a few segments' rows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa

from fer_batch.config import RunConfig
from fer_batch.errors import FerBatchError
from fer_batch.io import MediaReader
from fer_batch.io.sampling import TIME_EPS
from fer_batch.pipeline import smooth_probs
from fer_batch.schema import FACES_SCHEMA, PROB_COLUMNS, SMOOTH_COLUMNS, SourceRow, TrackSummary
from fer_batch.track import iou_matrix, linear_sum_assignment
from fer_batch.types import MediaSource

log = logging.getLogger(__name__)

_SORT_KEYS = [("frame_index", "ascending"), ("x1", "ascending"), ("y1", "ascending"), ("x2", "ascending"), ("y2", "ascending")]
_TAIL_COLUMNS = ["frame_index", "timestamp_s", "x1", "y1", "x2", "y2", "track_id"]
_WHOLE = (-math.inf, math.inf)


@dataclass(frozen=True)
class WorkUnit:
    """One unit of work: a whole source (``count == 1``) or segment ``index`` of ``count``.

    ``own`` is the time range this unit is responsible for (``own_start <= t < own_end``);
    ``read`` the range it decodes (``own`` plus the overlap before it). Both are ``None``
    for a whole source, which is then read exactly as an unsplit run reads it.
    """

    source: MediaSource
    index: int = 0
    count: int = 1
    own: Optional[tuple[float, float]] = None
    read: Optional[tuple[float, float]] = None

    @property
    def key(self) -> str:
        return f"{self.source.source_id}.{self.index:05d}"


@dataclass
class UnitResult:
    """What a runner gives back for one unit.

    ``faces``: the unit's rows (``FACES_SCHEMA``; a segment's track ids are its own).
    ``row``: its sources-table row. ``own_frames``: sampled frames in the unit's own range.
    ``info``: where it ran (``node_id``, ``pid``), for hooks.
    """

    unit: WorkUnit
    row: SourceRow
    own_frames: int
    faces: pa.Table | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def table(self) -> pa.Table:
        return FACES_SCHEMA.empty_table() if self.faces is None else self.faces

    @classmethod
    def failed(cls, unit: WorkUnit, error: str) -> "UnitResult":
        """A unit that never produced a result (its worker kept dying, or it raised)."""
        return cls(unit, SourceRow.failed(unit.source, error), 0, FACES_SCHEMA.empty_table())


def own_frame_count(unit: WorkUnit, frame_times: np.ndarray) -> int:
    """How many of the sampled frame times lie in the unit's own range."""
    if unit.own is None:
        return int(len(frame_times))
    t = np.asarray(frame_times, np.float64)
    return int(np.count_nonzero((t >= unit.own[0] - TIME_EPS) & (t < unit.own[1] - TIME_EPS)))


def unit_media_seconds(unit: WorkUnit, cfg: RunConfig, duration_s: float | None) -> float:
    """Seconds of media a unit reads: its segment and the sampling window, within the media."""
    if duration_s is None:
        return 0.0
    lo, hi = 0.0, float(duration_s)
    lo = max(lo, float(cfg.sampling.start_s or 0.0))
    if cfg.sampling.end_s is not None:
        hi = min(hi, float(cfg.sampling.end_s))
    if unit.read is not None:
        lo, hi = max(lo, unit.read[0]), min(hi, unit.read[1])
    return max(0.0, hi - lo)


# ----------------------------------------------------------------------------- splitting


def split_times(
    times: np.ndarray,
    segment_s: float,
    overlap_frames: int = 4,
    overlap_s: float = 0.0,
    min_last_segment: float = 0.25,
) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Split the planned frame times of a source into ``(own, read)`` time ranges.

    Args:
        times: timestamps (s) of the frames the sampling plan analyses, increasing.
        segment_s: target segment length; a last piece shorter than ``min_last_segment`` of it
            is folded into the previous segment, and segments own at least one frame.
        overlap_frames: sampled frames each segment reads before its own start.
        overlap_s: and at least this many seconds before it (the tracker's ``lost_s``).
        min_last_segment: see ``segment_s``.

    Returns:
        One ``((own_start, own_end), (read_start, own_end))`` per segment; the first starts
        at ``-inf`` and the last ends at ``+inf``. A single entry means: do not split.
    """
    ts = np.asarray(times, np.float64).reshape(-1)
    whole = [(_WHOLE, _WHOLE)]
    if len(ts) < 2 or not segment_s > 0 or not math.isfinite(segment_s):
        return whole
    span = float(ts[-1] - ts[0])
    n = max(1, math.ceil(span / segment_s - min_last_segment))
    if n == 1:
        return whole
    eps = TIME_EPS
    bounds: list[float] = []
    prev_i = 0
    for k in range(1, n):
        b = float(ts[0] + k * segment_s)
        i = int(np.searchsorted(ts, b - eps, side="left"))  # first frame owned by the new segment
        if i <= prev_i or i >= len(ts):
            continue  # the previous segment would own no frame, or this one none
        bounds.append(b)
        prev_i = i
    if not bounds:
        return whole
    edges = [-math.inf, *bounds, math.inf]
    out = []
    for k in range(len(edges) - 1):
        own = (edges[k], edges[k + 1])
        if k == 0:
            read_start = -math.inf
        else:
            i = int(np.searchsorted(ts, own[0] - eps, side="left"))
            j = min(i - overlap_frames, int(np.searchsorted(ts, own[0] - overlap_s - eps, side="left")))
            read_start = -math.inf if max(j, 0) == 0 else float(ts[j])
        out.append((own, (read_start, own[1])))
    return out


def plan_source(source: MediaSource, cfg: RunConfig) -> list[WorkUnit]:
    """The units of one source. Probes a video's frame times (no full decode) when it may be split.

    A source that cannot be probed, or cannot seek cheaply, is one unit (the runner then
    records why it fails, or reads it once from the start).
    """
    segment_s = cfg.segment_s
    if source.kind == "image" or not segment_s:
        return [WorkUnit(source)]
    reader = MediaReader(source, cfg.sampling, threads=1)
    try:
        reader.open()
        times = reader.timestamps[reader.plan]
        cheap = reader.seeks_cheaply
    except FerBatchError as e:
        log.debug("%s: probe failed (%s); one unit", source.path, e)
        return [WorkUnit(source)]
    finally:
        reader.close()
    p = cfg.plan
    pieces = split_times(times, segment_s, p.overlap_frames, cfg.track.lost_s, p.min_last_segment)
    if len(pieces) == 1:
        return [WorkUnit(source)]
    if not cheap:
        log.info("%s: not split into %d segments: its container cannot seek cheaply", source.path, len(pieces))
        return [WorkUnit(source)]
    n = len(pieces)
    return [WorkUnit(source, k, n, own, read) for k, (own, read) in enumerate(pieces)]


class Plan:
    """The units of a run's sources, planned lazily in input order.

    Iterating ``units()`` probes each source just before its first unit is handed out, so
    a runner with idle workers can start before every source has been probed.
    ``on_source_start(source)`` is called as a source's first unit is handed out (the place
    for a record that the source is in progress).
    """

    def __init__(
        self,
        sources: Iterable[MediaSource],
        cfg: RunConfig,
        on_source_start: Callable[[MediaSource], None] | None = None,
    ):
        self.sources = list(sources)
        self.cfg = cfg
        self.units_of: dict[str, int] = {}  # source_id -> number of units, once planned
        self.on_source_start = on_source_start

    @property
    def may_split(self) -> bool:
        return bool(self.cfg.segment_s) and any(s.kind != "image" for s in self.sources)

    def units(self) -> Iterator[WorkUnit]:
        for src in self.sources:
            if self.on_source_start is not None:  # before probing: a probe can crash the process too
                self.on_source_start(src)
            units = plan_source(src, self.cfg)
            self.units_of[src.source_id] = len(units)
            yield from units


class Assembler:
    """Collects unit results in any order and hands back complete sources in input order."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._next = 0
        self._done: dict[str, list[UnitResult]] = {}

    def add(self, result: UnitResult) -> None:
        self._done.setdefault(result.unit.source.source_id, []).append(result)

    def ready(self) -> Iterator[tuple[MediaSource, list[UnitResult]]]:
        """Sources whose units have all finished, in input order (each handed out once)."""
        while self._next < len(self.plan.sources):
            src = self.plan.sources[self._next]
            n = self.plan.units_of.get(src.source_id)
            got = self._done.get(src.source_id, [])
            if n is None or len(got) < n:
                return
            del self._done[src.source_id]
            self._next += 1
            yield src, sorted(got, key=lambda r: r.unit.index)


# ----------------------------------------------------------------------------- merging


class Stitcher:
    """Gives the segments of one source consistent track ids, and keeps each row once.

    Feed segments in time order. Each segment's tracker numbered its tracks from 0; a
    segment track that matches a track already emitted on the overlap frames (mean box IoU
    >= ``min_iou``, one-to-one, Hungarian on summed IoU) continues that id, any other track
    gets the next new id in order of first appearance.
    """

    def __init__(self, min_iou: float = 0.5):
        self.min_iou = min_iou
        self.next_id = 0
        self._tail: pa.Table | None = None  # emitted rows that a later overlap may cover

    def add(self, table: pa.Table, own: tuple[float, float], keep_from: float | None = None) -> pa.Table:
        """Rows of ``table`` owned by ``own``, with stitched ids, sorted by frame and box.

        Args:
            table: the segment's rows (``FACES_SCHEMA``, segment-local track ids).
            own: the time range the segment owns.
            keep_from: read start of the next segment: emitted rows from this time on are
                kept to stitch it (``None``: this is the last segment).
        """
        eps = TIME_EPS
        table = table.sort_by(_SORT_KEYS)
        t = table.column("timestamp_s").to_numpy()
        own_mask = (t >= own[0] - eps) & (t < own[1] - eps)
        ov_mask = t < own[0] - eps
        mapping: dict[int, int] = {}
        if self._tail is not None and self._tail.num_rows and ov_mask.any():
            mapping = self._match(table.filter(pa.array(ov_mask)))
        kept = table.filter(pa.array(own_mask))
        ids = kept.column("track_id").to_numpy()
        new_ids = np.empty(len(ids), np.int64)
        for i, lid in enumerate(ids.tolist()):
            if lid not in mapping:
                mapping[lid] = self.next_id
                self.next_id += 1
            new_ids[i] = mapping[lid]
        kept = kept.set_column(kept.schema.get_field_index("track_id"), "track_id", pa.array(new_ids, pa.int64()))
        if keep_from is not None:
            parts = [p for p in (self._tail, kept.select(_TAIL_COLUMNS)) if p is not None]
            tail = pa.concat_tables(parts)
            tt = tail.column("timestamp_s").to_numpy()
            self._tail = tail.filter(pa.array(tt >= keep_from - eps)).combine_chunks()
        else:
            self._tail = None
        return kept

    def _match(self, overlap: pa.Table) -> dict[int, int]:
        prev = self._tail
        pf = prev.column("frame_index").to_numpy()
        cf = overlap.column("frame_index").to_numpy()
        pb = np.stack([prev.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
        cb = np.stack([overlap.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
        g_ids, g_inv = np.unique(prev.column("track_id").to_numpy(), return_inverse=True)
        l_ids, l_inv = np.unique(overlap.column("track_id").to_numpy(), return_inverse=True)
        score = np.zeros((len(g_ids), len(l_ids)))
        support = np.zeros_like(score)
        for f in np.intersect1d(pf, cf):
            pi = np.flatnonzero(pf == f)
            ci = np.flatnonzero(cf == f)
            iou = iou_matrix(pb[pi], cb[ci])
            for a, b in zip(*np.nonzero(iou >= self.min_iou)):
                score[g_inv[pi[a]], l_inv[ci[b]]] += iou[a, b]
                support[g_inv[pi[a]], l_inv[ci[b]]] += 1
        if not score.any():
            return {}
        rows, cols = linear_sum_assignment(-score)
        out = {}
        for r, c in zip(rows, cols):
            if support[r, c] > 0 and score[r, c] / support[r, c] >= self.min_iou:
                out[int(l_ids[c])] = int(g_ids[r])
        return out


class WindowSmoother:
    """Recomputes per-track smoothing across segment borders with bounded memory.

    Segments (already stitched) come in time order; a segment is emitted once the segments
    after it reach half a window past its end, with its smoothed columns computed on the
    rows within half a window around it, so the values equal smoothing over the whole source
    (up to float rounding).
    """

    def __init__(self, window_s: float):
        self.h = window_s / 2.0
        self.eps = TIME_EPS
        self._buf: list[list[Any]] = []  # [own_start, own_end, table, emitted]

    def push(self, own: tuple[float, float], table: pa.Table) -> list[pa.Table]:
        self._buf.append([own[0], own[1], table, False])
        return self._flush(final=False)

    def finish(self) -> list[pa.Table]:
        return self._flush(final=True)

    def _flush(self, final: bool) -> list[pa.Table]:
        out = []
        latest_end = self._buf[-1][1] if self._buf else -math.inf
        for e in self._buf:
            if e[3]:
                continue
            if not final and not latest_end > e[1] + self.h + self.eps:
                break
            out.append(self._smooth(e))
            e[3] = True
        pending = [e for e in self._buf if not e[3]]
        frontier = pending[0][0] if pending else latest_end
        self._buf = [e for e in self._buf if not e[3] or e[1] > frontier - self.h - 2 * self.eps]
        return out

    def _smooth(self, e: list[Any]) -> pa.Table:
        start, end, table = e[0], e[1], e[2]
        if table.num_rows == 0:
            return table
        lo, hi = start - self.h - self.eps, end + self.h + self.eps
        ctx_parts = []
        for o in self._buf:
            if o is e:
                continue
            tt = o[2].column("timestamp_s").to_numpy()
            m = (tt >= lo) & (tt <= hi)
            if m.any():
                ctx_parts.append(o[2].filter(pa.array(m)))
        n = table.num_rows
        ctx = pa.concat_tables([table, *ctx_parts]) if ctx_parts else table
        tid = ctx.column("track_id").to_numpy()
        t = ctx.column("timestamp_s").to_numpy()
        probs = np.stack([ctx.column(c).to_numpy() for c in PROB_COLUMNS], axis=1)
        sm = smooth_probs(tid, t, probs, 2.0 * self.h)[:n]
        for j, c in enumerate(SMOOTH_COLUMNS):
            table = table.set_column(table.schema.get_field_index(c), c, pa.array(sm[:, j], pa.float32()))
        return table


def combine_rows(source: MediaSource, results: list[UnitResult], faces: int, tracks: int) -> SourceRow:
    """The sources-table row of a split source from its units' results."""
    statuses = [r.row.status for r in results]
    errors = []
    for r in results:
        if r.row.error:
            own = r.unit.own or _WHOLE
            where = f"[{own[0]:.1f}s, {own[1]:.1f}s) " if math.isfinite(own[0]) else ""
            errors.append(f"segment {r.unit.index + 1}/{r.unit.count} {where}{r.row.error}".strip())
    durations = [r.row.duration_s for r in results if r.row.duration_s is not None]
    figures = dict(
        duration_s=max(durations) if durations else None,
        frames_sampled=int(sum(r.own_frames for r in results)),
        faces=int(faces),
        tracks=int(tracks),
        wall_s=float(sum(r.row.wall_s or 0.0 for r in results)),
    )
    if all(s == "ok" for s in statuses):
        return SourceRow.ok(source, **figures)
    if all(s == "failed" for s in statuses):
        return SourceRow.failed(source, "; ".join(errors), **figures)
    return SourceRow.partial(source, "; ".join(errors), **figures)


def merge_source(
    source: MediaSource, results: list[UnitResult], cfg: RunConfig, emit: Callable[[pa.Table], None]
) -> tuple[SourceRow, pa.Table]:
    """Merge the unit results of one source: faces go to ``emit`` in time order.

    Returns:
        The source's row and its tracks table.
    """
    results = sorted(results, key=lambda r: r.unit.index)
    summary = TrackSummary()
    if len(results) == 1 and results[0].unit.count == 1:
        r = results[0]
        table = r.table()
        emit(table)
        return r.row, summary.add(table).table()
    stitcher = Stitcher(cfg.plan.stitch_min_iou)
    smoother = WindowSmoother(cfg.classify.smooth_s) if cfg.classify.smooth_s > 0 else None
    n_faces = 0

    def out(t: pa.Table) -> None:
        nonlocal n_faces
        emit(t)
        summary.add(t)
        n_faces += t.num_rows

    for i, r in enumerate(results):
        table = r.table()
        r.faces = None  # merged: let it go
        nxt = results[i + 1].unit.read[0] if i + 1 < len(results) else None
        stitched = stitcher.add(table, r.unit.own, keep_from=nxt)
        for t in [stitched] if smoother is None else smoother.push(r.unit.own, stitched):
            out(t)
    if smoother is not None:
        for t in smoother.finish():
            out(t)
    tracks = summary.table()
    return combine_rows(source, results, n_faces, tracks.num_rows), tracks


__all__ = [
    "WorkUnit", "UnitResult", "Plan", "Assembler", "split_times", "plan_source", "own_frame_count",
    "Stitcher", "WindowSmoother", "combine_rows", "merge_source",
]  # fmt: skip
