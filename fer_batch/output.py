"""Writing the three output tables, atomically, to a local path or a pyarrow filesystem URI.

``report.parquet`` (faces), ``report.sources.parquet`` and ``report.tracks.parquet`` beside it.
Every file is written under a hidden temporary name beside its final one (``.NAME.XXXX.tmp``:
a temporary file in the same directory, or a temporary key in the same bucket prefix) and
moved into place only when it is complete: ``os.replace`` locally, a server-side copy then a
delete of the temporary key on object stores (``s3://`` ...; the copy replaces the object
atomically for readers). A run that fails before finishing removes its temporary files and
leaves the last good outputs in place; a run that is interrupted (Ctrl-C, SIGTERM, an error
outside the inputs) writes the sources it completed with ``fer_batch.complete = false`` in
every file's metadata (``true`` otherwise). See jobs/README.md for what is guaranteed.
"""

from __future__ import annotations

import base64
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fer_batch.errors import OutputError
from fer_batch.schema import FACES_SCHEMA, META_COMPLETE, SOURCES_SCHEMA, TRACKS_SCHEMA, rows_to_table, with_metadata

log = logging.getLogger(__name__)


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def companion_paths(out: str | os.PathLike) -> tuple[str, str, str]:
    """(faces, sources, tracks) output locations for an ``--out`` value."""
    out = str(out)
    if not out.endswith(".parquet"):
        raise OutputError(f"--out must end with .parquet, got {out!r}")
    stem = out[: -len(".parquet")]
    return out, stem + ".sources.parquet", stem + ".tracks.parquet"


def resolve_fs(path: str) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, path inside it, is_local)."""
    if is_uri(path) and not str(path).startswith("file://"):
        fs, p = pafs.FileSystem.from_uri(str(path))
        return fs, p, isinstance(fs, pafs.LocalFileSystem)
    p = str(path)[len("file://"):] if str(path).startswith("file://") else str(path)
    return pafs.LocalFileSystem(), os.path.abspath(p), True


def check_writable(out: str) -> None:
    """Fail early (before any work) when the output location cannot be written."""
    fs, p, local = resolve_fs(out)
    if not local:
        return
    parent = Path(p).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create output directory {parent}: {e}") from e
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out}: output directory {parent} is not writable")
    if Path(p).is_dir():
        raise OutputError(f"{out}: is a directory")


class AtomicParquetWriter:
    """Streams row groups into one Parquet file that appears only when ``close()`` succeeds."""

    def __init__(self, path: str, schema: pa.Schema):
        self.fs, self.path, self.local = resolve_fs(path)
        self.schema = schema
        # the temporary file / key beside the final one (same directory: same filesystem, same bucket)
        self.tmp = str(Path(self.path).with_name(f".{Path(self.path).name}.{uuid.uuid4().hex[:8]}.tmp"))
        if self.local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        try:
            self._sink = self.fs.open_output_stream(self.tmp)
            self._writer = pq.ParquetWriter(self._sink, schema, compression="zstd")
        except BaseException as e:  # SIGTERM or Ctrl-C in here too: no temp file left behind
            if getattr(self, "_sink", None) is not None:
                try:
                    self._sink.close()  # (an object store uploads on close: then the key is deleted)
                except Exception:  # noqa: BLE001
                    pass
            self._remove_tmp()
            if isinstance(e, (OSError, pa.ArrowException)):
                raise OutputError(f"{path}: cannot write: {e}") from e
            raise

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table.cast(self.schema) if table.schema != self.schema else table)
            self.rows += table.num_rows

    def close(self, metadata: Mapping[bytes, bytes] | None = None) -> None:
        """Finish the file (adding ``metadata`` to its footer) and move it into place."""
        try:
            if metadata:
                # Footer key-values, and the same in the stored Arrow schema (what
                # ``pq.read_schema(...).metadata`` and every Arrow reader return).
                schema = self.schema.with_metadata({**(self.schema.metadata or {}), **metadata})
                kv = {k.decode(): v.decode() for k, v in metadata.items()}
                kv["ARROW:schema"] = base64.b64encode(schema.serialize().to_pybytes()).decode()
                self._writer.add_key_value_metadata(kv)
            self._writer.close()
            self._sink.close()
            if self.local:
                os.replace(self.tmp, self.path)
            else:
                self.fs.move(self.tmp, self.path)
        except BaseException as e:
            self._remove_tmp()
            if isinstance(e, (OSError, pa.ArrowException)):
                raise OutputError(f"{self.path}: cannot write: {e}") from e
            raise

    def abort(self) -> None:
        """Drop the temporary file; the final name keeps what it had (the last good output)."""
        try:
            self._writer.close()
            self._sink.close()
        except Exception:  # noqa: BLE001 - removing the temp file matters more
            pass
        finally:
            self._remove_tmp()

    def _remove_tmp(self) -> None:
        try:
            if self.local:
                if os.path.exists(self.tmp):
                    os.unlink(self.tmp)
            elif self.fs.get_file_info(self.tmp).type != pafs.FileType.NotFound:
                self.fs.delete_file(self.tmp)
        except (OSError, pa.ArrowException) as e:
            log.warning("could not remove the temporary output %s: %s", self.tmp, e)


def write_table(path: str, table: pa.Table) -> None:
    w = AtomicParquetWriter(path, table.schema)
    try:
        w.write(table)
    except BaseException:
        w.abort()
        raise
    w.close()


def _completeness(complete: bool) -> dict[bytes, bytes]:
    return {META_COMPLETE: b"true" if complete else b"false"}


@dataclass
class RunOutputs:
    """The three tables of a run, streamed: faces per source as they come, the rest at the end."""

    out: str
    version: str
    models: Mapping[str, Any]
    config: Mapping[str, Any]

    def __post_init__(self) -> None:
        self.faces_path, self.sources_path, self.tracks_path = companion_paths(self.out)
        meta = dict(version=self.version, models=self.models, config=self.config)
        self.faces_schema = with_metadata(FACES_SCHEMA.empty_table(), **meta).schema
        self.sources_schema = with_metadata(SOURCES_SCHEMA.empty_table(), **meta).schema
        self.tracks_schema = with_metadata(TRACKS_SCHEMA.empty_table(), **meta).schema
        self._faces = AtomicParquetWriter(self.faces_path, self.faces_schema)
        self._track_parts: list[pa.Table] = []

    def write_faces(self, faces: pa.Table) -> None:
        """Stream face rows; their track summaries come through :meth:`add_tracks`."""
        self._faces.write(faces)

    def add_tracks(self, tracks: pa.Table) -> None:
        self._track_parts.append(tracks)

    def finish(self, source_rows: list[dict], complete: bool = True) -> None:
        """Close the faces file and write the sources and tracks tables; ``complete=False``
        (an interrupted run) is recorded in the metadata of all three."""
        flag = _completeness(complete)
        tracks = pa.concat_tables(self._track_parts) if self._track_parts else TRACKS_SCHEMA.empty_table()
        sources = rows_to_table(source_rows, SOURCES_SCHEMA)
        try:
            write_table(self.tracks_path, tracks.replace_schema_metadata({**self.tracks_schema.metadata, **flag}))
            write_table(self.sources_path, sources.replace_schema_metadata({**self.sources_schema.metadata, **flag}))
        except BaseException:
            self._faces.abort()
            raise
        self._faces.close(flag)  # the faces file last: the one a reader opens first

    def abort(self) -> None:
        self._faces.abort()
