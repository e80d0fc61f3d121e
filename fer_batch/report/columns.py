"""Column names the report reads, taken from :mod:`fer_batch.schema`.

Each name is looked up in its schema at import time, so a rename in ``schema.py`` fails here
loudly instead of silently reading nothing.
"""

from __future__ import annotations

import pyarrow as pa

from fer_batch.schema import FACES_SCHEMA, PROB_COLUMNS, SMOOTH_COLUMNS, SOURCES_SCHEMA, TRACKS_SCHEMA


def _name(schema: pa.Schema, name: str) -> str:
    return schema.field(name).name  # KeyError at import if the schema changed


SOURCE_ID = _name(FACES_SCHEMA, "source_id")
SOURCE_PATH = _name(FACES_SCHEMA, "source_path")
FRAME_INDEX = _name(FACES_SCHEMA, "frame_index")
TIMESTAMP = _name(FACES_SCHEMA, "timestamp_s")
TRACK_ID = _name(FACES_SCHEMA, "track_id")
BOX = tuple(_name(FACES_SCHEMA, c) for c in ("x1", "y1", "x2", "y2"))
PROBS = PROB_COLUMNS
SMOOTHED = SMOOTH_COLUMNS

SRC_ID = _name(SOURCES_SCHEMA, "source_id")
SRC_PATH = _name(SOURCES_SCHEMA, "path")
SRC_KIND = _name(SOURCES_SCHEMA, "kind")
SRC_STATUS = _name(SOURCES_SCHEMA, "status")
SRC_ERROR = _name(SOURCES_SCHEMA, "error")
SRC_DURATION = _name(SOURCES_SCHEMA, "duration_s")

TRK_SOURCE_ID = _name(TRACKS_SCHEMA, "source_id")

# What the report reads of the faces table (landmarks, scores and labels are not needed).
FACES_REQUIRED: tuple[str, ...] = (SOURCE_ID, SOURCE_PATH, FRAME_INDEX, TIMESTAMP, TRACK_ID, *BOX, *PROBS)
SOURCES_REQUIRED: tuple[str, ...] = (SRC_ID, SRC_PATH, SRC_STATUS)
