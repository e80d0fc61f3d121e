"""The Ray runner: the same ``process_source`` in worker actors, on one machine or a cluster.

This is the only module of fer-batch that imports ``ray``.

How a run goes
  * Units of work: one source, or one time segment of a long video / image sequence
    (``RayConfig.segment_s``). A segment also decodes a short overlap before its start
    (at least ``OVERLAP_FRAMES`` sampled frames and at least ``TrackConfig.lost_s`` seconds),
    so its fresh tracker already follows every face that is alive at the border.
  * Worker actors (``num_workers``, ``cpus_per_worker``, fractional ``gpus_per_worker``)
    load the models once in their constructor. A unit writes its rows as one Parquet part
    whose name is fixed by source and segment (a retried unit overwrites the same part)
    into a run-scoped staging folder next to the output (or under ``_staging/`` on an object
    store), and returns only the small sources-table row: decoded frames and face rows never
    travel through Ray's object store.
  * The driver merges the parts into the three output files one source at a time, in input
    order: it stitches track ids across segment borders (tracks matched by box IoU on the
    overlap frames, which both segments analysed), keeps every row exactly once (a segment
    owns the frames ``own_start <= t < own_end``; its overlap rows are dropped), recomputes
    temporal smoothing over the borders, and removes the staging folder at the end. Memory
    is bounded by one segment's rows, however many and however long the inputs are.
  * A bad input fails alone (its row in the sources table says why). A worker process that
    dies is restarted by Ray and its unit retried (``max_restarts`` / ``max_task_retries``);
    a unit that keeps killing workers is recorded as failed.

Embedded mode (no address): a private Ray instance on 127.0.0.1 only, with token
authentication, no dashboard unless asked, its own temp folder, shut down at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fer_batch import __version__
from fer_batch.config import RunConfig
from fer_batch.errors import ConfigError, FerBatchError, OutputError
from fer_batch.pipeline import Hook, Stages, process_source, smooth_probs
from fer_batch.schema import (
    FACES_SCHEMA,
    PROB_COLUMNS,
    SMOOTH_COLUMNS,
    SOURCES_SCHEMA,
    TRACKS_SCHEMA,
    rows_to_table,
    tracks_table,
)
from fer_batch.types import EMOTIONS, MediaSource

log = logging.getLogger(__name__)

# Sampled frames every segment re-analyses before its own start. More frames give the fresh
# tracker more history (steadier ids across the border) and the stitcher more evidence, at
# the cost of decoding and detecting them twice.
OVERLAP_FRAMES = 4
# A segment shorter than this share of segment_s is folded into the previous one.
MIN_LAST_SEGMENT = 0.25
# Mean box IoU a segment's track must reach with a previous track on the shared overlap
# frames to continue its id. Both sides ran the same detector on the same frames, so a real
# continuation scores ~1.0; lowering it joins more loosely matching tracks (risk of merging
# two people who crossed at the border), raising it splits more ids.
STITCH_MIN_IOU = 0.5
# Ray fault tolerance: a killed worker process is restarted this many times, and a unit that
# was running on it is retried this many times, before the unit is given up.
WORKER_MAX_RESTARTS = 3
TASK_MAX_RETRIES = 3
# A unit whose worker died (after Ray's own retries) is resubmitted to another worker this
# many times in total before it is recorded as failed (a file that crashes the decoder).
UNIT_MAX_ATTEMPTS = 2
# Parts are written with this many tries (object stores fail transiently).
PART_WRITE_TRIES = 3
# Object store of the embedded instance: only small rows travel through it.
EMBEDDED_OBJECT_STORE_BYTES = 256 * 1024 * 1024
# How long to wait for the first worker to start before giving up (cluster may be scaling).
READY_TIMEOUT_S = 900.0

_SORT_KEYS = [("frame_index", "ascending"), ("x1", "ascending"), ("y1", "ascending"), ("x2", "ascending"), ("y2", "ascending")]


_TAIL_COLUMNS = ["frame_index", "timestamp_s", "x1", "y1", "x2", "y2", "track_id"]


def _time_eps() -> float:
    from fer_batch.io.sampling import TIME_EPS

    return TIME_EPS


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class WorkUnit:
    """One Ray task: a whole source (``count == 1``) or segment ``index`` of ``count``.

    ``own`` is the time range this unit is responsible for (``own_start <= t < own_end``);
    ``read`` the range it decodes (``own`` plus the overlap before it). Both are ``None``
    for a whole source, which is then read exactly as the local runner reads it.
    """

    source: MediaSource
    index: int = 0
    count: int = 1
    own: Optional[tuple[float, float]] = None
    read: Optional[tuple[float, float]] = None

    @property
    def key(self) -> str:
        return f"{self.source.source_id}.{self.index:05d}"

    @property
    def part_name(self) -> str:
        """Deterministic part file name: a retried unit overwrites its own part."""
        return f"{self.source.source_id}/{self.index:05d}-of-{self.count:05d}.parquet"


def split_times(
    times: np.ndarray, segment_s: float, overlap_frames: int = OVERLAP_FRAMES, overlap_s: float = 0.0
) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Split the planned frame times of a source into ``(own, read)`` time ranges.

    Args:
        times: timestamps (s) of the frames the sampling plan analyses, increasing.
        segment_s: target segment length; a last piece shorter than ``MIN_LAST_SEGMENT`` of it
            is folded into the previous segment, and segments own at least one frame.
        overlap_frames: sampled frames each segment reads before its own start.
        overlap_s: and at least this many seconds before it (the tracker's ``lost_s``).

    Returns:
        One ``((own_start, own_end), (read_start, own_end))`` per segment; the first starts
        at ``-inf`` and the last ends at ``+inf``. A single entry means: do not split.
    """
    ts = np.asarray(times, np.float64).reshape(-1)
    whole = [((-math.inf, math.inf), (-math.inf, math.inf))]
    if len(ts) < 2 or not segment_s > 0 or not math.isfinite(segment_s):
        return whole
    span = float(ts[-1] - ts[0])
    n = max(1, math.ceil(span / segment_s - MIN_LAST_SEGMENT))
    if n == 1:
        return whole
    eps = _time_eps()
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
            read_start = float(ts[max(j, 0)])
            if max(j, 0) == 0:
                read_start = -math.inf
        out.append((own, (read_start, own[1])))
    return out


def plan_source(source: MediaSource, cfg: RunConfig) -> list[WorkUnit]:
    """The units of one source. Probes a video's frame times (no full decode) when it may be long.

    A source that cannot be probed becomes one unit: the worker then records why it fails.
    """
    segment_s = cfg.segment_s
    if source.kind == "image" or not segment_s or segment_s <= 0:
        return [WorkUnit(source)]
    from fer_batch.io import MediaReader

    reader = MediaReader(source, cfg.sampling, threads=1)
    try:
        reader.open()
        times = reader.timestamps[reader.plan]
    except FerBatchError as e:
        log.debug("%s: probe failed (%s); one unit", source.path, e)
        return [WorkUnit(source)]
    finally:
        reader.close()
    pieces = split_times(times, segment_s, OVERLAP_FRAMES, cfg.track.lost_s)
    if len(pieces) == 1:
        return [WorkUnit(source)]
    n = len(pieces)
    return [WorkUnit(source, k, n, own, read) for k, (own, read) in enumerate(pieces)]


# ----------------------------------------------------------------------------- staging


def staging_location(out: str | None, run_id: str) -> tuple[str, bool]:
    """(staging folder or URI for this run, whether it is a private local temp folder).

    Local output: a hidden folder beside it (same filesystem, shared storage on a cluster).
    Object store: ``<parent>/_staging/<run_id>``. No output: a local temp folder.
    """
    from fer_batch.output import is_uri

    if out is None:
        return tempfile.mkdtemp(prefix="fer-batch-staging-"), True
    if is_uri(out) and not out.startswith("file://"):
        parent = out.rsplit("/", 1)[0]
        return f"{parent}/_staging/{run_id}", False
    p = Path(out[len("file://"):] if out.startswith("file://") else out).absolute()
    return str(p.parent / f".{p.name}.staging-{run_id}"), False


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def write_part(staging: str, unit: WorkUnit, table: pa.Table) -> str:
    """Write one unit's rows under its deterministic name (atomic locally, one PUT on S3)."""
    from fer_batch.output import write_table

    path = _join(staging, unit.part_name)
    for attempt in range(1, PART_WRITE_TRIES + 1):
        try:
            write_table(path, table)
            return path
        except (OSError, pa.ArrowException, OutputError) as e:
            if attempt == PART_WRITE_TRIES:
                raise OutputError(f"{path}: cannot write part after {attempt} tries: {e}") from e
            log.warning("%s: write failed (%s); retrying", path, e)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def read_part(path: str) -> pa.Table:
    from fer_batch.output import resolve_fs

    fs, p, _ = resolve_fs(path)
    try:
        return pq.read_table(p, filesystem=fs, schema=FACES_SCHEMA)
    except (OSError, pa.ArrowException) as e:
        raise OutputError(f"{path}: cannot read staged part: {e}") from e


PROBE_NAME = "_probe"


def write_probe(staging: str, token: str) -> None:
    """Create the staging folder with a file only this run's workers should find in it."""
    from fer_batch.output import resolve_fs

    fs, p, local = resolve_fs(staging)
    try:
        if local:  # object stores have no folders: the key is enough
            fs.create_dir(p, recursive=True)
        with fs.open_output_stream(f"{p}/{PROBE_NAME}") as f:
            f.write(token.encode())
    except (OSError, pa.ArrowException) as e:
        raise OutputError(f"{staging}: cannot create the staging folder: {e}") from e


def staging_problem(staging: str, token: str) -> str | None:
    """Why this process cannot use the driver's staging folder (None: it can).

    On a cluster, a worker on another node sees a local ``--out`` path only if that path is on
    storage every node mounts at the same place; without this check its parts would land on
    its own disk and the driver would fail (or, worse, find a stale file) at merge time.
    """
    from fer_batch.output import resolve_fs

    try:
        fs, p, _ = resolve_fs(staging)
        with fs.open_input_stream(f"{p}/{PROBE_NAME}") as f:
            got = f.read().decode(errors="replace")
    except (OSError, pa.ArrowException) as e:
        return f"cannot read {_join(staging, PROBE_NAME)}: {_short(e)}"
    if got != token:
        return f"{_join(staging, PROBE_NAME)} holds another run's token (a different folder with the same path?)"
    return None


def remove_staging(staging: str) -> None:
    from fer_batch.output import resolve_fs

    fs, p, _ = resolve_fs(staging)
    try:
        if fs.get_file_info(p).type != pafs.FileType.NotFound:
            fs.delete_dir(p)
    except (OSError, pa.ArrowException) as e:
        log.warning("%s: could not remove the staging folder: %s", staging, e)


# ----------------------------------------------------------------------------- merging


class Stitcher:
    """Gives the segments of one source consistent track ids, and keeps each row once.

    Feed segments in time order. Each segment's tracker numbered its tracks from 0; a
    segment track that matches a track already emitted on the overlap frames (mean box IoU
    >= ``min_iou``, one-to-one, Hungarian on summed IoU) continues that id, any other track
    gets the next new id in order of first appearance.
    """

    def __init__(self, min_iou: float = STITCH_MIN_IOU):
        self.min_iou = min_iou
        self.next_id = 0
        self._tail: pa.Table | None = None  # emitted rows that a later overlap may cover
        self.eps = _time_eps()

    def add(
        self,
        table: pa.Table,
        own: tuple[float, float],
        keep_from: float | None = None,
    ) -> pa.Table:
        """Rows of ``table`` owned by ``own``, with stitched ids, sorted by frame and box.

        Args:
            table: the segment's rows (``FACES_SCHEMA``, segment-local track ids).
            own: the time range the segment owns.
            keep_from: read start of the next segment: emitted rows from this time on are
                kept to stitch it (``None``: this is the last segment).
        """
        from fer_batch.track import iou_matrix

        eps = self.eps
        table = table.sort_by(_SORT_KEYS)
        t = table.column("timestamp_s").to_numpy()
        own_mask = (t >= own[0] - eps) & (t < own[1] - eps)
        ov_mask = t < own[0] - eps
        mapping: dict[int, int] = {}
        if self._tail is not None and self._tail.num_rows and ov_mask.any():
            mapping = self._match(table.filter(pa.array(ov_mask)), iou_matrix)
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

    def _match(self, overlap: pa.Table, iou_matrix) -> dict[int, int]:
        from scipy.optimize import linear_sum_assignment

        prev = self._tail
        pf = prev.column("frame_index").to_numpy()
        cf = overlap.column("frame_index").to_numpy()
        pb = np.stack([prev.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
        cb = np.stack([overlap.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
        pid = prev.column("track_id").to_numpy()
        cid = overlap.column("track_id").to_numpy()
        g_ids, g_inv = np.unique(pid, return_inverse=True)
        l_ids, l_inv = np.unique(cid, return_inverse=True)
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
        self.eps = _time_eps()
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


class TrackAccumulator:
    """Per-track summary (``TRACKS_SCHEMA``) of one source, built incrementally."""

    def __init__(self, source_id: str, source_path: str):
        self.source_id, self.source_path = source_id, source_path
        self._acc: dict[int, list[Any]] = {}

    def add(self, faces: pa.Table) -> None:
        if faces.num_rows == 0:
            return
        tid = faces.column("track_id").to_numpy()
        t = faces.column("timestamp_s").to_numpy()
        probs = np.stack([faces.column(c).to_numpy() for c in PROB_COLUMNS], axis=1).astype(np.float64)
        for k in np.unique(tid).tolist():
            m = tid == k
            a = self._acc.get(k)
            tk, pk = t[m], probs[m].sum(axis=0)
            if a is None:
                self._acc[k] = [float(tk.min()), float(tk.max()), int(m.sum()), pk]
            else:
                a[0], a[1], a[2], a[3] = min(a[0], float(tk.min())), max(a[1], float(tk.max())), a[2] + int(m.sum()), a[3] + pk

    def table(self) -> pa.Table:
        if not self._acc:
            return TRACKS_SCHEMA.empty_table()
        ks = sorted(self._acc)
        means = np.stack([self._acc[k][3] / self._acc[k][2] for k in ks])
        cols: dict[str, Any] = {
            "source_id": [self.source_id] * len(ks),
            "source_path": [self.source_path] * len(ks),
            "track_id": ks,
            "first_timestamp_s": [self._acc[k][0] for k in ks],
            "last_timestamp_s": [self._acc[k][1] for k in ks],
            "frames": [self._acc[k][2] for k in ks],
            "dominant_emotion": [EMOTIONS[i] for i in means.argmax(axis=1)],
        }
        for j, c in enumerate(PROB_COLUMNS):
            cols[f"mean_{c}"] = pa.array(means[:, j], pa.float32())
        return pa.Table.from_pydict(cols, schema=TRACKS_SCHEMA)


def combine_rows(source: MediaSource, metas: list[dict], faces: int, tracks: int) -> dict:
    """The sources-table row of a segmented source from its units' results."""
    statuses = [m["row"]["status"] for m in metas]
    if all(s == "ok" for s in statuses):
        status = "ok"
    elif all(s == "failed" for s in statuses):
        status = "failed"
    else:
        status = "partial"
    errors = []
    for m in metas:
        err = m["row"].get("error")
        if err:
            own = m.get("own") or (None, None)
            where = f"[{own[0]:.1f}s, {own[1]:.1f}s) " if own[0] is not None and math.isfinite(own[0] or 0) else ""
            errors.append(f"segment {m['index'] + 1}/{m['count']} {where}{err}".strip())
    durations = [m["row"].get("duration_s") for m in metas if m["row"].get("duration_s") is not None]
    return {
        "source_id": source.source_id,
        "path": str(source.path),
        "kind": source.kind,
        "status": status,
        "error": "; ".join(errors) or None,
        "duration_s": max(durations) if durations else None,
        "frames_sampled": int(sum(m.get("own_frames", 0) for m in metas)),
        "faces": int(faces),
        "tracks": int(tracks),
        "wall_s": float(sum(m["row"].get("wall_s") or 0.0 for m in metas)),
    }


def failed_meta(unit: WorkUnit, error: str) -> dict:
    """A unit that never produced a result (its worker kept dying, or the task raised)."""
    row = {
        "source_id": unit.source.source_id, "path": str(unit.source.path), "kind": unit.source.kind,
        "status": "failed", "error": error, "duration_s": None, "frames_sampled": 0, "faces": 0,
        "tracks": 0, "wall_s": 0.0,
    }  # fmt: skip
    return {"key": unit.key, "index": unit.index, "count": unit.count, "own": unit.own, "read": unit.read, "row": row,
            "part": None, "rows": 0, "own_frames": 0, "node_id": None, "pid": None}  # fmt: skip


class _Sink:
    """Where merged rows go: the three output files, or memory when there is no ``out``."""

    def __init__(self, out: str | None, models: dict, cfg: RunConfig):
        from fer_batch.output import RunOutputs

        self.outputs = RunOutputs(out, __version__, models, cfg.to_dict()) if out else None
        self.kept: list[pa.Table] = []

    def faces(self, table: pa.Table) -> None:
        if self.outputs is not None:
            self.outputs.write_faces(table)
        elif table.num_rows:
            self.kept.append(table)

    def tracks(self, table: pa.Table) -> None:
        if self.outputs is not None:
            self.outputs.add_tracks(table)

    def finish(self, rows: list[dict]) -> pa.Table | None:
        if self.outputs is not None:
            self.outputs.finish(rows)
            return None
        return pa.concat_tables(self.kept) if self.kept else FACES_SCHEMA.empty_table()


def merge_source(source: MediaSource, metas: list[dict], cfg: RunConfig, sink: _Sink) -> dict:
    """Merge the staged parts of one source into the sink; return its sources-table row."""
    metas = sorted(metas, key=lambda m: m["index"])
    if len(metas) == 1 and metas[0]["count"] == 1:
        m = metas[0]
        table = read_part(m["part"]).sort_by(_SORT_KEYS) if m["part"] else FACES_SCHEMA.empty_table()
        sink.faces(table)
        sink.tracks(tracks_table(table))
        return m["row"]
    stitcher = Stitcher()
    smoother = WindowSmoother(cfg.classify.smooth_s) if cfg.classify.smooth_s > 0 else None
    acc = TrackAccumulator(source.source_id, str(source.path))
    n_faces = 0

    def emit(t: pa.Table) -> None:
        nonlocal n_faces
        sink.faces(t)
        acc.add(t)
        n_faces += t.num_rows

    for i, m in enumerate(metas):
        table = read_part(m["part"]) if m["part"] else FACES_SCHEMA.empty_table()
        nxt = metas[i + 1]["read"][0] if i + 1 < len(metas) else None
        stitched = stitcher.add(table, tuple(m["own"]), keep_from=nxt)
        if smoother is None:
            emit(stitched)
        else:
            for t in smoother.push(tuple(m["own"]), stitched):
                emit(t)
    if smoother is not None:
        for t in smoother.finish():
            emit(t)
    tracks = acc.table()
    sink.tracks(tracks)
    return combine_rows(source, metas, n_faces, tracks.num_rows)


# ----------------------------------------------------------------------------- worker


class FerWorker:
    """A Ray actor: loads the models once, then runs units and writes their parts."""

    def __init__(self, cfg: RunConfig, staging: str, gpus: float, probe: str | None = None):
        import ray

        from fer_batch.device import resolve_device

        threads = cfg.threads or max(1, int(round(cfg.ray.cpus_per_worker or 1)))
        self.cfg = replace(cfg, threads=threads)
        self.device = resolve_device(cfg.classify.device) if gpus > 0 else "cpu"
        self.staging = staging
        self.stages = Stages(self.cfg, self.device).setup()
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.pid = os.getpid()
        self.staging_problem = staging_problem(staging, probe) if probe is not None else None

    def ready(self) -> dict:
        return {"node_id": self.node_id, "node_ip": self.node_ip, "pid": self.pid, "device": self.device,
                "models": self.stages.models_info(), "staging_problem": self.staging_problem}  # fmt: skip

    def run(self, unit: WorkUnit) -> dict:
        eps = _time_eps()
        own_start = unit.own[0] if unit.own else -math.inf
        counted = {"own": 0}

        def hook(step: str, payload: dict) -> None:
            if step == "frame" and payload["timestamp_s"] >= own_start - eps:
                counted["own"] += 1

        res = process_source(unit.source, self.stages, self.cfg, hook=hook, segment=unit.read)
        part = write_part(self.staging, unit, res.faces) if res.faces.num_rows else None
        return {
            "key": unit.key, "index": unit.index, "count": unit.count, "own": unit.own, "read": unit.read,
            "row": res.row, "part": part, "rows": res.faces.num_rows, "own_frames": counted["own"],
            "node_id": self.node_id, "pid": self.pid,
        }  # fmt: skip


# ----------------------------------------------------------------------------- driver


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def embedded_env() -> dict[str, str]:
    """Environment for a private loopback-only Ray instance.

    Ray 2.60 otherwise advertises (and listens on) the machine's network address. Token
    authentication is kept on: with no token configured, a random one lives only in this
    process's environment (inherited by the Ray processes it starts).
    """
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or (
        Path.home() / ".ray" / "auth_token"
    ).exists()
    if "RAY_AUTH_MODE" not in os.environ and not has_token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24))
    return env


def _reload_auth_config() -> None:
    """Make this process re-read RAY_AUTH_* (Ray caches them when it is imported)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as e:  # another Ray version: it reads them at init
        log.debug("could not refresh Ray's auth settings: %s", e)


@contextlib.contextmanager
def ray_session(cfg: RunConfig) -> Iterator[dict]:
    """Connect to Ray: reuse an initialised one, join ``cfg.ray.address``, or start a private one.

    Without ``cfg.ray.address``, ``RAY_ADDRESS`` is honoured as ``ray.init`` does (inside a
    Ray job it names the job's cluster), and only when neither is set is a private instance
    started. Yields a dict with ``embedded`` and ``address``. Only what this function started
    is shut down (never a cluster it joined).
    """
    import ray

    if ray.is_initialized():
        yield {"embedded": False, "address": "(already connected)"}
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log.isEnabledFor(logging.DEBUG))
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"--ray-address {address}: cannot connect to Ray: {e}") from e
        try:
            yield {"embedded": False, "address": address}
        finally:
            ray.shutdown()
        return
    # Ray's Unix socket paths must stay under 107 bytes: keep the temp folder short.
    base = "/tmp" if len(tempfile.gettempdir()) > 40 and os.path.isdir("/tmp") else None
    tmp = tempfile.mkdtemp(prefix="fer-batch-ray-", dir=base)
    env = embedded_env()
    ok = False
    import ray._private.ray_constants as rc

    old_flag = rc.ENABLE_RAY_CLUSTER
    try:
        with _env(env):
            rc.ENABLE_RAY_CLUSTER = False  # ray was imported before the env var was set
            _reload_auth_config()
            try:
                info = ray.init(
                    address="local",
                    include_dashboard=bool(cfg.ray.dashboard),
                    dashboard_host="127.0.0.1",
                    _temp_dir=tmp,
                    object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                    logging_level=logging.WARNING,
                    log_to_driver=log.isEnabledFor(logging.DEBUG),
                    namespace="fer-batch",
                )
                if cfg.ray.dashboard:
                    token = f"; token: {env['RAY_AUTH_TOKEN']}" if "RAY_AUTH_TOKEN" in env else ""
                    log.warning("Ray dashboard: http://%s (loopback only)%s", getattr(info, "dashboard_url", None), token)
                yield {"embedded": True, "address": ray.get_runtime_context().gcs_address, "temp_dir": tmp}
                ok = True
            finally:
                ray.shutdown()
    finally:
        rc.ENABLE_RAY_CLUSTER = old_flag
        _reload_auth_config()  # back to the caller's settings
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.warning("Ray logs of the failed run kept in %s", tmp)


def _worker_count(cfg: RunConfig, n_sources: int, may_split: bool) -> int:
    import ray

    if cfg.ray.num_workers:
        return int(cfg.ray.num_workers)
    res = ray.cluster_resources()
    cap = math.inf
    if cfg.ray.cpus_per_worker > 0:
        cap = math.floor(res.get("CPU", 0) / cfg.ray.cpus_per_worker + 1e-9)
    if cfg.ray.gpus_per_worker > 0:
        cap = min(cap, math.floor(res.get("GPU", 0) / cfg.ray.gpus_per_worker + 1e-9))
    if cap is math.inf:
        cap = 1
    n = int(cap) if may_split else min(int(cap), n_sources)
    return max(1, n)


def _check_config(cfg: RunConfig, out: str | None) -> None:
    r = cfg.ray
    if r.num_workers is not None and r.num_workers < 1:
        raise ConfigError(f"--num-workers must be >= 1, got {r.num_workers}")
    if r.cpus_per_worker < 0 or r.gpus_per_worker < 0:
        raise ConfigError("--cpus-per-worker and --gpus-per-worker must be >= 0")
    if r.gpus_per_worker > 1 and r.gpus_per_worker != int(r.gpus_per_worker):
        raise ConfigError(f"--gpus-per-worker above 1 must be a whole number, got {r.gpus_per_worker}")
    if cfg.classify.device.startswith("cuda") and r.gpus_per_worker == 0:
        raise ConfigError(f"--device {cfg.classify.device} with --runner ray needs --gpus-per-worker > 0")
    if out is None and r.address:
        raise ConfigError("--runner ray on a cluster needs --out on storage every node can reach")


def run_ray(
    sources: list[MediaSource],
    not_processed_rows: list[dict],
    out: str | None,
    cfg: RunConfig,
    device: str,
    hook: Hook | None = None,
    t0: float | None = None,
):
    """Process ``sources`` on Ray and write the same three files as the local runner.

    Args:
        sources: discovered media, in input order (the output follows this order).
        not_processed_rows: sources-table rows of skipped / unreadable inputs.
        out: output Parquet path or URI, or ``None`` to return the faces in memory.
        cfg: the run configuration (``cfg.ray`` for the cluster side).
        device: the driver's resolved device (workers resolve their own).
        hook: ``hook(step, payload)``; steps ``ray_start``, ``worker_ready``, ``unit_done``,
            ``source_end`` (as sources are merged, in input order).
        t0: ``time.perf_counter()`` at the start of the run.

    Returns:
        ``fer_batch.api.ProcessResult``.
    """

    from fer_batch.api import ProcessResult

    t0 = time.perf_counter() if t0 is None else t0
    hook = hook or (lambda step, payload: None)
    _check_config(cfg, out)
    if device.startswith("cuda") and cfg.ray.gpus_per_worker == 0:
        log.warning("a GPU is available but --gpus-per-worker is 0: Ray workers run on CPU")
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    rows: list[dict] = list(not_processed_rows)
    with ray_session(cfg) as session:
        staging, _ = staging_location(out, run_id)
        probe = secrets.token_hex(16)
        try:
            write_probe(staging, probe)
            faces, models = _drive(sources, rows, out, cfg, staging, hook, session, probe)
        finally:
            remove_staging(staging)
    return ProcessResult(
        sources=rows_to_table(rows, SOURCES_SCHEMA), out=out, models=models, config=cfg,
        wall_s=time.perf_counter() - t0, _faces=faces,
    )  # fmt: skip


@dataclass
class _ActorSlot:
    handle: Any
    ready_ref: Any = None
    ready: bool = False
    busy: Any = None  # ObjectRef of the running unit
    info: dict = field(default_factory=dict)


def _drive(sources, rows, out, cfg, staging, hook, session, probe=None):
    import ray
    from ray.exceptions import RayActorError, RayError, RayTaskError

    may_split = any(s.kind != "image" for s in sources)
    n_workers = _worker_count(cfg, len(sources), may_split) if sources else 0
    hook("ray_start", {"address": session["address"], "embedded": session["embedded"], "workers": n_workers,
                       "sources": len(sources), "staging": staging})  # fmt: skip
    remote_cls = ray.remote(FerWorker).options(
        num_cpus=cfg.ray.cpus_per_worker,
        num_gpus=cfg.ray.gpus_per_worker,
        max_restarts=WORKER_MAX_RESTARTS,
        max_task_retries=TASK_MAX_RETRIES,
        scheduling_strategy="SPREAD",
    )

    def new_slot() -> _ActorSlot:
        h = remote_cls.remote(cfg, staging, cfg.ray.gpus_per_worker, probe)
        return _ActorSlot(h, ready_ref=h.ready.remote())

    slots = [new_slot() for _ in range(n_workers)]
    replacements_left = 2 * n_workers
    models: dict = {}
    sink: _Sink | None = None

    todo_sources = deque(sources)
    queue: deque[WorkUnit] = deque()
    attempts: dict[str, int] = {}
    units_of: dict[str, int] = {}  # source_id -> number of units (known once planned)
    done: dict[str, list[dict]] = {}  # source_id -> finished unit metas
    merge_i = 0
    nodes: set[str] = set()
    started = time.monotonic()

    def next_unit() -> WorkUnit | None:
        while not queue and todo_sources:
            src = todo_sources.popleft()
            units = plan_source(src, cfg)
            units_of[src.source_id] = len(units)
            queue.extend(units)
        return queue.popleft() if queue else None

    def finish_unit(unit: WorkUnit, meta: dict) -> None:
        done.setdefault(unit.source.source_id, []).append(meta)
        if meta.get("node_id"):
            nodes.add(meta["node_id"])
        hook("unit_done", {"source": unit.source, "index": unit.index, "count": unit.count, "node_id": meta.get("node_id"),
                           "pid": meta.get("pid"), "rows": meta.get("rows", 0), "status": meta["row"]["status"]})  # fmt: skip

    def merge_ready() -> None:
        nonlocal merge_i
        while merge_i < len(sources) and sink is not None:
            src = sources[merge_i]
            n = units_of.get(src.source_id)
            got = done.get(src.source_id, [])
            if n is None or len(got) < n:
                return
            row = merge_source(src, got, cfg, sink)
            rows.append(row)
            del done[src.source_id]
            hook("source_end", {"source": src, "row": row})
            merge_i += 1

    inflight: dict[Any, tuple[_ActorSlot, WorkUnit]] = {}
    try:
        while True:
            # hand work to every ready, idle worker
            for s in slots:
                if s.ready and s.busy is None:
                    unit = next_unit()
                    if unit is None:
                        break
                    ref = s.handle.run.remote(unit)
                    s.busy = ref
                    inflight[ref] = (s, unit)
            merge_ready()
            waiting = list(inflight) + [s.ready_ref for s in slots if s.ready_ref is not None]
            if not inflight and not queue and not todo_sources:
                break
            if not waiting:
                raise FerBatchError("Ray runner: no worker left to run the remaining units")
            ready_refs, _ = ray.wait(waiting, num_returns=1, timeout=30.0)
            if not ready_refs:
                if not any(s.ready for s in slots) and time.monotonic() - started > READY_TIMEOUT_S:
                    raise FerBatchError(
                        f"Ray runner: no worker started within {READY_TIMEOUT_S:.0f} s; does the cluster have "
                        f"{cfg.ray.cpus_per_worker} CPU / {cfg.ray.gpus_per_worker} GPU free for one worker?"
                    )
                continue
            ref = ready_refs[0]
            slot = next((s for s in slots if s.ready_ref == ref), None)
            if slot is not None:  # a worker finished loading its models
                slot.ready_ref = None
                try:
                    slot.info = ray.get(ref)
                except RayError as e:
                    log.warning("a Ray worker failed to start: %s", _short(e))
                    slots.remove(slot)
                    _kill(slot)
                    if replacements_left > 0 and not slots:
                        replacements_left -= 1
                        slots.append(new_slot())
                    elif not slots:
                        raise FerBatchError(f"Ray runner: workers cannot start: {_short(e)}") from e
                    continue
                if slot.info.get("staging_problem"):
                    where = f"--out {out}" if out else "the driver's temporary folder (no --out)"
                    raise ConfigError(
                        f"Ray worker on node {slot.info.get('node_ip')} cannot reach the staging folder {staging} "
                        f"({where}): {slot.info['staging_problem']}. On a multi-node cluster --out must be on storage "
                        "every node mounts at the same path, or an object-store URI such as s3://bucket/report.parquet"
                    )
                slot.ready = True
                hook("worker_ready", dict(slot.info))
                if sink is None:
                    models = slot.info["models"]
                    sink = _Sink(out, models, cfg)
                continue
            slot, unit = inflight.pop(ref)
            slot.busy = None
            try:
                meta = ray.get(ref)
            except RayTaskError as e:  # the unit raised (e.g. cannot write its part)
                meta = failed_meta(unit, f"worker error: {_short(e)}")
            except RayActorError as e:  # the worker died and Ray's retries are spent
                attempts[unit.key] = attempts.get(unit.key, 0) + 1
                slots.remove(slot)
                _kill(slot)
                if replacements_left > 0:
                    replacements_left -= 1
                    slots.append(new_slot())
                if attempts[unit.key] < UNIT_MAX_ATTEMPTS:
                    log.warning("%s: worker died (%s); resubmitting", unit.key, _short(e))
                    queue.appendleft(unit)
                    continue
                meta = failed_meta(unit, f"worker process died {attempts[unit.key]} times on this input: {_short(e)}")
            except RayError as e:  # e.g. its result was lost with a node
                meta = failed_meta(unit, f"Ray error: {_short(e)}")
            finish_unit(unit, meta)
        merge_ready()
        if sink is None:  # no sources at all (or none ever ran)
            sink = _Sink(out, models, cfg)
        faces = sink.finish(rows)
    except BaseException:
        if sink is not None and sink.outputs is not None:
            log.warning("interrupted: writing the %d sources completed so far", merge_i)
            try:
                sink.finish(rows)
            except Exception:  # noqa: BLE001 - keep the original error
                sink.outputs.abort()
        raise
    finally:
        for s in slots:
            _kill(s)
    log.info("Ray run: %d sources on %d workers across %d node(s)", len(sources), n_workers, len(nodes))
    hook("ray_end", {"workers": n_workers, "nodes": sorted(nodes)})
    return faces, models


def _kill(slot: _ActorSlot) -> None:
    import ray

    try:
        ray.kill(slot.handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _short(e: BaseException, limit: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


__all__ = [
    "WorkUnit",
    "split_times",
    "plan_source",
    "Stitcher",
    "WindowSmoother",
    "TrackAccumulator",
    "combine_rows",
    "merge_source",
    "FerWorker",
    "run_ray",
    "embedded_env",
    "ray_session",
]
