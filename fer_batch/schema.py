"""THE Parquet schemas of fer-batch outputs, defined once.

Writers, the report, the Ray runner and the tests import from here.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

from fer_batch.types import EMOTIONS, FaceDetections

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


def rows_to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """A list of dicts (one per row) as a table of ``schema`` (missing keys are null)."""
    rows = list(rows)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def tracks_table(faces: pa.Table) -> pa.Table:
    """Per-track summary (``TRACKS_SCHEMA``) of a faces table."""
    if faces.num_rows == 0:
        return TRACKS_SCHEMA.empty_table()
    df = faces.select(["source_id", "source_path", "track_id", "timestamp_s", *PROB_COLUMNS]).to_pandas()
    g = df.groupby(["source_id", "track_id"], sort=True)
    out = g.agg(
        source_path=("source_path", "first"),
        first_timestamp_s=("timestamp_s", "min"),
        last_timestamp_s=("timestamp_s", "max"),
        frames=("timestamp_s", "size"),
        **{f"mean_{c}": (c, "mean") for c in PROB_COLUMNS},
    ).reset_index()
    means = out[[f"mean_{c}" for c in PROB_COLUMNS]].to_numpy()
    out["dominant_emotion"] = [EMOTIONS[i] for i in means.argmax(axis=1)]
    out["frames"] = out["frames"].astype("int64")
    return pa.Table.from_pandas(out[[f.name for f in TRACKS_SCHEMA]], schema=TRACKS_SCHEMA, preserve_index=False)


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
    return out
