"""Turn the user's inputs (files and folders) into media sources, deterministically."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from fer_batch.config import SamplingConfig
from fer_batch.schema import SourceRow
from fer_batch.types import MediaSource

log = logging.getLogger(__name__)

VIDEO_EXTS: frozenset[str] = frozenset(
    {
        ".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".m2v", ".ts", ".mts",
        ".m2ts", ".wmv", ".asf", ".flv", ".f4v", ".3gp", ".3g2", ".ogv", ".vob", ".mxf", ".divx",
    }
)  # fmt: skip
IMAGE_EXTS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".webp", ".tif", ".tiff",
        ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".avif",
    }
)  # fmt: skip

_ID_LEN = 12


def source_id_for(path: str | Path) -> str:
    """Short stable id of an input: the first 12 hex digits of sha1 of its resolved path."""
    resolved = Path(path).expanduser().resolve(strict=False)
    return hashlib.sha1(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:_ID_LEN]


def natural_key(name: str) -> tuple:
    """Sort key that orders ``frame2`` before ``frame10`` (case-insensitive, then exact)."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), p) if p.isdigit() else (1, p.lower(), p) for p in parts if p != ""), name


def media_kind(path: str | Path) -> str:
    """``video``, ``image`` or ``other``, by extension (case-insensitive)."""
    ext = Path(path).suffix.lower()
    if ext in VIDEO_EXTS:
        return "video"
    if ext in IMAGE_EXTS:
        return "image"
    return "other"


def row_for(path: str | Path, kind: str, status: str, error: str | None) -> dict[str, Any]:
    """A SOURCES_SCHEMA row (as a dict) for an input that is not processed."""
    return SourceRow.not_processed(source_id_for(path), str(path), kind, status, error).to_dict()


def discover(
    inputs: list[str | Path], sampling: SamplingConfig
) -> tuple[list[MediaSource], list[dict[str, Any]]]:
    """Walk the inputs and return (media sources, rows of inputs that are not processed).

    Files and directories (recursively, in natural name order) in the order given. Missing or
    unreadable paths give a ``failed`` row; files that are not media give a ``skipped`` row
    (kind ``other``). Hidden entries (names starting with ``.``, e.g. ``.DS_Store`` or macOS
    ``._clip.mp4`` resource forks) inside folders are ignored. A file reached twice (listed
    twice, or through a symlink) is kept once. With ``sampling.images_as == "sequence"`` the
    images of each folder become one ``image_sequence`` source (frames in natural name order,
    ``fps = sampling.image_fps``); a single image given directly stays an ``image`` source.
    """
    sources: list[MediaSource] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    as_sequence = sampling.images_as == "sequence"

    def add_file(p: Path, kind: str) -> None:
        sid = source_id_for(p)
        if sid in seen:
            log.debug("%s: listed more than once; kept once", p)
            return
        seen.add(sid)
        if kind == "other":
            rows.append(row_for(p, "other", "skipped", f"not a media file (extension {p.suffix.lower() or 'none'!r})"))
            return
        problem = _unreadable(p)
        if problem:
            rows.append(row_for(p, kind, "failed", f"{p}: {problem}"))
            return
        sources.append(MediaSource(path=p, kind=kind, source_id=sid))

    def add_sequence(folder: Path, images: list[Path]) -> None:
        sid = source_id_for(folder)
        if sid in seen:
            return
        seen.add(sid)
        readable: list[Path] = []
        for img in images:
            problem = _unreadable(img)
            if problem:
                rows.append(row_for(img, "image", "failed", f"{img}: {problem}"))
            else:
                readable.append(img)
        if readable:
            sources.append(
                MediaSource(path=folder, kind="image_sequence", source_id=sid, frames=tuple(readable),
                            fps=float(sampling.image_fps))
            )  # fmt: skip

    for raw in inputs:
        p = Path(os.path.abspath(os.path.expanduser(str(raw))))
        if not os.path.lexists(p):
            rows.append(row_for(p, _kind_or_other(p), "failed", f"{p}: no such file or directory"))
            continue
        if not p.exists():  # a dangling symlink
            rows.append(row_for(p, _kind_or_other(p), "failed", f"{p}: broken symbolic link"))
            continue
        if p.is_dir():
            for folder, files, problem in _walk(p):
                if problem:
                    rows.append(row_for(folder, "other", "failed", f"{folder}: {problem}"))
                    continue
                images: list[Path] = []
                for f in files:
                    kind = media_kind(f)
                    if kind == "image" and as_sequence:
                        images.append(f)
                    else:
                        add_file(f, kind)
                if images:
                    add_sequence(folder, images)
        else:
            add_file(p, media_kind(p))
    return sources, rows


def _kind_or_other(p: Path) -> str:
    """Kind of a path that cannot be looked at: by extension (a folder name has none)."""
    return media_kind(p)


def _walk(root: Path):
    """Yield (folder, files in natural order, problem) depth-first in natural order."""
    try:
        with os.scandir(root) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except PermissionError:
        yield root, [], "permission denied (cannot list folder)"
        return
    except OSError as e:
        yield root, [], f"cannot list folder ({e.strerror or e})"
        return
    entries.sort(key=lambda e: natural_key(e.name))
    files: list[Path] = []
    dirs: list[Path] = []
    for e in entries:
        try:
            if e.is_dir():  # follows symlinks; loops are cut by the resolved-path check below
                dirs.append(Path(e.path))
            elif e.is_file():
                files.append(Path(e.path))
            elif e.is_symlink():
                files.append(Path(e.path))  # dangling: reported by _unreadable
        except OSError:
            files.append(Path(e.path))
    yield root, files, None
    for d in dirs:
        if d.is_symlink() and _is_ancestor_link(d):
            log.warning("%s: symlink loop; not followed", d)
            continue
        yield from _walk(d)


def _is_ancestor_link(d: Path) -> bool:
    try:
        target = d.resolve(strict=True)
    except (OSError, RuntimeError):
        return True
    return target in d.parent.resolve().parents or target == d.parent.resolve()


def _unreadable(p: Path) -> str | None:
    """Why ``p`` cannot be read, or None. Opens it (permission bits lie for root)."""
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(p) else "no such file"
    except PermissionError:
        return "permission denied"
    except IsADirectoryError:
        return "is a directory"
    except OSError as e:
        return f"cannot read file ({e.strerror or e})"
    return None
