"""Read the Parquet outputs of ``fer-batch process`` for the report (Parquet only)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fer_batch.errors import DataError, InputError
from fer_batch.report.columns import FACES_REQUIRED, SMOOTHED, SOURCES_REQUIRED
from fer_batch.schema import FACES_SCHEMA, SCHEMA_VERSION, SOURCES_SCHEMA, read_metadata

log = logging.getLogger(__name__)


@dataclass
class ReportData:
    """The tables of one ``fer-batch process`` output, as DataFrames."""

    path: Path
    faces: pd.DataFrame
    sources: pd.DataFrame | None
    meta: dict[str, Any] = field(default_factory=dict)
    sources_path: Path | None = None


def companion_path(out: Path, kind: str) -> Path:
    """``report.parquet`` -> ``report.<kind>.parquet`` (kind: ``sources`` or ``tracks``)."""
    out = Path(out)
    stem = out.name.removesuffix(".parquet")
    return out.with_name(f"{stem}.{kind}.parquet")


def _read(path: Path, columns: list[str] | None, what: str) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: cannot read the {what} as Parquet: {e}") from e


def _schema(path: Path, what: str) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({what}): {e}") from e


def _type_class(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_null(t):
        return "null"
    return str(t)


def check_types(schema: pa.Schema, expected: pa.Schema, names: list[str] | tuple[str, ...], where: Path) -> None:
    """DataError unless each column of ``names`` present in ``schema`` has the kind of type
    (string / integer / float) ``expected`` gives it: a file from elsewhere is untrusted, and a
    string where a number belongs must stop here, not deep inside the figures or the HTML. An
    all-null column (type null) passes."""
    bad = []
    for n in names:
        if n not in schema.names or n not in expected.names:
            continue
        got, want = _type_class(schema.field(n).type), _type_class(expected.field(n).type)
        if got != want and got != "null" and not (want == "float" and got == "integer"):
            bad.append(f"{n} ({schema.field(n).type}, expected {want})")
    if bad:
        raise DataError(f"{where}: not a fer-batch table: wrong column types: {', '.join(bad)}")


def _metadata(schema: pa.Schema, where: Path) -> dict[str, Any]:
    """The fer-batch metadata, or DataError when it is not valid UTF-8 / JSON."""
    try:
        return read_metadata(schema)
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{where}: unreadable fer-batch metadata ({type(e).__name__}: {e})") from e


def load_report(path: str | Path) -> ReportData:
    """Read a faces table and the sources table beside it, or a partitioned dataset directory
    (``fer-batch process --incremental``: ``DATASET/date=.../part-*.parquet``; it holds no
    sources table, so only sources with faces are listed).

    Raises:
        InputError: the file is missing or not Parquet.
        DataError: it is not a fer-batch faces table (missing columns, another schema major
            version).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file (expected the --out Parquet of `fer-batch process`)")
    if path.is_dir():
        return _load_dataset(path)
    schema = _schema(path, "faces table")
    missing = [c for c in FACES_REQUIRED if c not in schema.names]
    if missing:
        raise DataError(f"{path}: not a fer-batch faces table: missing columns {missing}")
    meta = _metadata(schema, path)
    version = meta.get("schema_version")
    if version and version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise DataError(f"{path}: written with schema version {version}; this fer-batch reads {SCHEMA_VERSION}")
    cols = list(FACES_REQUIRED) + [c for c in SMOOTHED if c in schema.names]
    check_types(schema, FACES_SCHEMA, cols, path)
    faces = _read(path, cols, "faces table").to_pandas()

    sources = None
    spath = companion_path(path, "sources")
    if spath.exists():
        st = _read(spath, None, "sources table")
        miss = [c for c in SOURCES_REQUIRED if c not in st.schema.names]
        if miss:
            raise DataError(f"{spath}: not a fer-batch sources table: missing columns {miss}")
        check_types(st.schema, SOURCES_SCHEMA, st.schema.names, spath)
        sources = st.to_pandas()
    else:
        log.warning("%s: no sources table beside it (%s); listing only sources that have faces", path, spath.name)
        spath = None
    return ReportData(path=path, faces=faces, sources=sources, meta=meta, sources_path=spath)


def _load_dataset(root: Path) -> ReportData:
    """The faces rows of a hive-partitioned dataset directory (names starting with ``_`` or
    ``.`` are skipped, as pyarrow does)."""
    import pyarrow.dataset as pads

    try:
        dset = pads.dataset(str(root), format="parquet", partitioning="hive")
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{root}: cannot read the folder as a Parquet dataset: {e}") from e
    if not dset.files:
        raise InputError(f"{root}: is a folder without Parquet files; give report.parquet or a dataset folder")
    missing = [c for c in FACES_REQUIRED if c not in dset.schema.names]
    if missing:
        raise DataError(f"{root}: not a fer-batch faces dataset: missing columns {missing}")
    meta = _metadata(pq.read_schema(dset.files[0]), root)
    version = meta.get("schema_version")
    if version and version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise DataError(f"{root}: written with schema version {version}; this fer-batch reads {SCHEMA_VERSION}")
    cols = list(FACES_REQUIRED) + [c for c in SMOOTHED if c in dset.schema.names]
    check_types(dset.schema, FACES_SCHEMA, cols, root)
    try:
        faces = dset.to_table(columns=cols).to_pandas()
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{root}: cannot read the dataset: {e}") from e
    return ReportData(path=root, faces=faces, sources=None, meta=meta, sources_path=None)
