"""THE Parquet schemas of fer-batch outputs, defined once.

Writers, the report, the Ray runner and the tests import from here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

from fer_batch.errors import DataError
from fer_batch.types import EMOTIONS, FaceDetections, MediaSource

SCHEMA_VERSION = "1.0"

PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{e}" for e in EMOTIONS)
SMOOTH_COLUMNS: tuple[str, ...] = tuple(f"p_{e}_smoothed" for e in EMOTIONS)

# One row per face per sampled frame.
FACES_SCHEMA = pa.schema(
    [
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("timestamp_s", pa.float64(), nullable=False),
        pa.field("track_id", pa.int64(), nullable=False),
        pa.field("x1", pa.float32(), nullable=False),
        pa.field("y1", pa.float32(), nullable=False),
        pa.field("x2", pa.float32(), nullable=False),
        pa.field("y2", pa.float32(), nullable=False),
        pa.field("det_score", pa.float32(), nullable=False),
        pa.field("landmarks", pa.list_(pa.float32(), 10), nullable=False),
        pa.field("emotion", pa.string(), nullable=False),
        pa.field("emotion_score", pa.float32(), nullable=False),
        *[pa.field(c, pa.float32(), nullable=False) for c in PROB_COLUMNS],
        # Present (non-null) only when temporal smoothing was asked for; raw p_* are always kept.
        *[pa.field(c, pa.float32(), nullable=True) for c in SMOOTH_COLUMNS],
    ]
)

SOURCE_STATUSES = ("ok", "partial", "failed", "skipped")
SOURCE_KINDS = ("video", "image", "image_sequence", "other")

# One row per input.
SOURCES_SCHEMA = pa.schema(
    [
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # video | image | image_sequence | other
        pa.field("status", pa.string(), nullable=False),  # ok | partial | failed | skipped
        pa.field("error", pa.string(), nullable=True),
        pa.field("duration_s", pa.float64(), nullable=True),
        pa.field("frames_sampled", pa.int64(), nullable=False),
        pa.field("faces", pa.int64(), nullable=False),
        pa.field("tracks", pa.int64(), nullable=False),
        pa.field("wall_s", pa.float64(), nullable=False),
    ]
)

# One row per track.
TRACKS_SCHEMA = pa.schema(
    [
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("track_id", pa.int64(), nullable=False),
        pa.field("first_timestamp_s", pa.float64(), nullable=False),
        pa.field("last_timestamp_s", pa.float64(), nullable=False),
        pa.field("frames", pa.int64(), nullable=False),
        pa.field("dominant_emotion", pa.string(), nullable=False),
        *[pa.field(f"mean_{c}", pa.float32(), nullable=False) for c in PROB_COLUMNS],
    ]
)

META_SCHEMA_VERSION = b"fer_batch.schema_version"
META_VERSION = b"fer_batch.version"
META_MODELS = b"fer_batch.models"
META_CONFIG = b"fer_batch.config"
META_COMPLETE = b"fer_batch.complete"  # "true"; "false" in the outputs of an interrupted run


def faces_to_table(
    source_id: str,
    source_path: str,
    dets: FaceDetections,
    smoothed: np.ndarray | None = None,
) -> pa.Table:
    """Rows of one source as a table of ``FACES_SCHEMA``. ``dets.probs`` must be filled."""
    n = len(dets)
    probs = dets.probs if n else np.zeros((0, len(EMOTIONS)), np.float32)
    if len(probs) != n:
        raise ValueError(f"faces_to_table: expected {n} probability rows, got {len(probs)}")
    best = probs.argmax(axis=1) if n else np.zeros(0, np.int64)
    cols: dict[str, Any] = {
        "source_id": pa.array([source_id] * n, pa.string()),
        "source_path": pa.array([source_path] * n, pa.string()),
        "frame_index": pa.array(dets.frame_index, pa.int64()),
        "timestamp_s": pa.array(dets.timestamp_s, pa.float64()),
        "track_id": pa.array(dets.track_id, pa.int64()),
        "x1": pa.array(dets.xyxy[:, 0], pa.float32()),
        "y1": pa.array(dets.xyxy[:, 1], pa.float32()),
        "x2": pa.array(dets.xyxy[:, 2], pa.float32()),
        "y2": pa.array(dets.xyxy[:, 3], pa.float32()),
        "det_score": pa.array(dets.det_score, pa.float32()),
        "landmarks": pa.FixedSizeListArray.from_arrays(
            pa.array(dets.kps.reshape(-1).astype(np.float32), pa.float32()), 10
        ),
        "emotion": pa.array([EMOTIONS[i] for i in best], pa.string()),
        "emotion_score": pa.array(probs[np.arange(n), best] if n else [], pa.float32()),
    }
    for j, c in enumerate(PROB_COLUMNS):
        cols[c] = pa.array(probs[:, j], pa.float32())
    for j, c in enumerate(SMOOTH_COLUMNS):
        cols[c] = pa.array(smoothed[:, j] if smoothed is not None else [None] * n, pa.float32())
    return pa.Table.from_pydict(cols, schema=FACES_SCHEMA)


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def rows_to_table(rows: Iterable[Mapping[str, Any] | "SourceRow"], schema: pa.Schema) -> pa.Table:
    """Rows (dicts or :class:`SourceRow`) as a table of ``schema`` (missing keys are null)."""
    dicts = [r.to_dict() if isinstance(r, SourceRow) else r for r in rows]
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in dicts], schema=schema)


@dataclass(frozen=True)
class SourceRow:
    """One row of the sources table (``SOURCES_SCHEMA``): what happened to one input.

    Build it with :meth:`ok`, :meth:`partial`, :meth:`failed` or :meth:`skipped`; the
    constructor checks the status and kind, so a row that the schema would refuse cannot exist.
    """

    source_id: str
    path: str
    kind: str
    status: str
    error: str | None = None
    duration_s: float | None = None
    frames_sampled: int = 0
    faces: int = 0
    tracks: int = 0
    wall_s: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in SOURCE_STATUSES:
            raise DataError(f"SourceRow.status: expected one of {', '.join(SOURCE_STATUSES)}, got {self.status!r}")
        if self.kind not in SOURCE_KINDS:
            raise DataError(f"SourceRow.kind: expected one of {', '.join(SOURCE_KINDS)}, got {self.kind!r}")
        if self.status in ("failed", "skipped", "partial") and not self.error:
            raise DataError(f"SourceRow: a {self.status} row needs an error saying why ({self.path})")

    @classmethod
    def ok(cls, source: MediaSource, **figures: Any) -> "SourceRow":
        """A source processed to the end (``figures``: duration_s, frames_sampled, faces, tracks, wall_s)."""
        return cls(source.source_id, str(source.path), source.kind, "ok", None, **figures)

    @classmethod
    def partial(cls, source: MediaSource, error: str, **figures: Any) -> "SourceRow":
        """Decoding broke off after some frames; the rows before the damage are kept."""
        return cls(source.source_id, str(source.path), source.kind, "partial", error, **figures)

    @classmethod
    def failed(cls, source: MediaSource, error: str, **figures: Any) -> "SourceRow":
        """A source that gave no usable result (its error says why)."""
        return cls(source.source_id, str(source.path), source.kind, "failed", error, **figures)

    @classmethod
    def not_processed(cls, source_id: str, path: str, kind: str, status: str, error: str) -> "SourceRow":
        """An input found while discovering that never became a source (``skipped`` or ``failed``)."""
        return cls(source_id, str(path), kind, status, error)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "SourceRow":
        """From a dict with the schema's field names (extra keys are ignored)."""
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls) if f.name in row})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_(self, **changes: Any) -> "SourceRow":
        return dataclasses.replace(self, **changes)


def sources_to_table(rows: Iterable[SourceRow | Mapping[str, Any]]) -> pa.Table:
    """The sources table of ``rows``."""
    return rows_to_table(rows, SOURCES_SCHEMA)


class TrackSummary:
    """Per-track summary (``TRACKS_SCHEMA``), built from faces tables added in any chunks.

    The only implementation of the tracks table: a whole run's faces at once, or one source's
    rows segment by segment (memory: one entry per track).
    """

    def __init__(self) -> None:
        # (source_id, track_id) -> [source_path, first_t, last_t, frames, sum of probabilities]
        self._acc: dict[tuple[str, int], list[Any]] = {}

    def add(self, faces: pa.Table) -> "TrackSummary":
        if faces.num_rows == 0:
            return self
        sid = np.asarray(faces.column("source_id").to_pylist(), dtype=object)
        spath = faces.column("source_path").to_pylist()
        tid = faces.column("track_id").to_numpy()
        t = faces.column("timestamp_s").to_numpy()
        probs = np.stack([faces.column(c).to_numpy() for c in PROB_COLUMNS], axis=1).astype(np.float64)
        keys = list(zip(sid.tolist(), tid.tolist()))
        first_row: dict[tuple[str, int], int] = {}
        groups: dict[tuple[str, int], list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
            first_row.setdefault(k, i)
        for k, idx in groups.items():
            ix = np.asarray(idx)
            tk, pk = t[ix], probs[ix].sum(axis=0)
            a = self._acc.get(k)
            if a is None:
                self._acc[k] = [spath[first_row[k]], float(tk.min()), float(tk.max()), len(ix), pk]
            else:
                a[1], a[2], a[3], a[4] = min(a[1], float(tk.min())), max(a[2], float(tk.max())), a[3] + len(ix), a[4] + pk
        return self

    def __len__(self) -> int:
        return len(self._acc)

    def table(self) -> pa.Table:
        if not self._acc:
            return TRACKS_SCHEMA.empty_table()
        ks = sorted(self._acc)
        acc = [self._acc[k] for k in ks]
        means = np.stack([a[4] / a[3] for a in acc])
        cols: dict[str, Any] = {
            "source_id": [k[0] for k in ks],
            "source_path": [a[0] for a in acc],
            "track_id": [k[1] for k in ks],
            "first_timestamp_s": [a[1] for a in acc],
            "last_timestamp_s": [a[2] for a in acc],
            "frames": [a[3] for a in acc],
            "dominant_emotion": [EMOTIONS[i] for i in means.argmax(axis=1)],
        }
        for j, c in enumerate(PROB_COLUMNS):
            cols[f"mean_{c}"] = pa.array(means[:, j], pa.float32())
        return pa.Table.from_pydict(cols, schema=TRACKS_SCHEMA)


def tracks_table(faces: pa.Table) -> pa.Table:
    """Per-track summary (``TRACKS_SCHEMA``) of a faces table."""
    return TrackSummary().add(faces).table()


def with_metadata(table: pa.Table, *, version: str, models: Mapping[str, Any], config: Mapping[str, Any]) -> pa.Table:
    """Attach fer-batch's key-value metadata (schema version, versions, models, config)."""
    meta = dict(table.schema.metadata or {})
    meta.update(
        {
            META_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
            META_VERSION: version.encode(),
            META_MODELS: json.dumps(models, sort_keys=True, default=str).encode(),
            META_CONFIG: json.dumps(config, sort_keys=True, default=str).encode(),
        }
    )
    return table.replace_schema_metadata(meta)


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The fer-batch metadata of a written table, decoded."""
    m = schema.metadata or {}
    out: dict[str, Any] = {}
    if META_SCHEMA_VERSION in m:
        out["schema_version"] = m[META_SCHEMA_VERSION].decode()
    if META_VERSION in m:
        out["version"] = m[META_VERSION].decode()
    if META_MODELS in m:
        out["models"] = json.loads(m[META_MODELS])
    if META_CONFIG in m:
        out["config"] = json.loads(m[META_CONFIG])
    if META_COMPLETE in m:
        out["complete"] = m[META_COMPLETE] == b"true"
    return out
