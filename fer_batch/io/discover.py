"""Turn the user's inputs (files and folders) into media sources, deterministically."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
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

# The Pillow decoders an image file may be opened with, by extension: files are decoded only
# with the formats these extensions stand for (whatever their content claims), so an EPS or
# PDF named .jpg never reaches Ghostscript, nor a file any other of Pillow's many decoders.
# A JPEG named .png still opens (all formats below are allowed for every image extension).
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    ".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".jpe": ("JPEG",), ".jfif": ("JPEG",),
    ".png": ("PNG",), ".bmp": ("BMP",), ".dib": ("DIB",), ".webp": ("WEBP",),
    ".tif": ("TIFF",), ".tiff": ("TIFF",), ".gif": ("GIF",),
    ".ppm": ("PPM",), ".pgm": ("PPM",), ".pbm": ("PPM",), ".pnm": ("PPM",),
    ".tga": ("TGA",), ".jp2": ("JPEG2000",), ".j2k": ("JPEG2000",), ".avif": ("AVIF",),
}  # fmt: skip
if set(IMAGE_FORMATS) != IMAGE_EXTS:  # pragma: no cover - a new extension needs its format
    raise RuntimeError(f"IMAGE_FORMATS and IMAGE_EXTS differ: {set(IMAGE_FORMATS) ^ IMAGE_EXTS}")

_ID_LEN = 12


def source_id_for(path: str | Path) -> str:
    """Short stable id of an input: the first 12 hex digits of sha1 of its resolved path."""
    try:
        resolved = Path(path).expanduser().resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop: its own absolute path stands for it
        resolved = Path(os.path.abspath(os.path.expanduser(str(path))))
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


def display_path(path: str | Path) -> str:
    """``path`` as text that can be stored and printed: a name that is not valid UTF-8 (Python
    keeps its bytes as lone surrogates) gets ``\\xNN`` for each such byte."""
    s = str(path)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return os.fsencode(s).decode("utf-8", "backslashreplace")


# What a directory entry that is neither a folder nor a regular file is, for the skip reason.
_SPECIAL = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _special_kind(mode: int) -> str:
    for test, what in _SPECIAL:
        if test(mode):
            return what
    return "not a regular file"


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

    The walk is safe on trees it did not make:

    - every folder is walked once, identified by ``(st_dev, st_ino)``, so symbolic links between
      folders (loops, or webs of links between siblings) cannot make it repeat or grow; a link
      to one of its own ancestors is listed as ``skipped`` (a loop);
    - a symbolic link (to a file or a folder) that resolves outside the folders given as inputs
      is ``skipped`` and not followed, unless ``sampling.follow_links``; a path given directly
      as an input is always followed. Links are followed after the real folders, so a file
      that is both inside a folder and linked from elsewhere is listed under its real path;
    - named pipes, sockets and devices are ``skipped`` with a reason and never opened (opening
      a FIFO would block the run);
    - a name that is not valid UTF-8 is ``failed`` (outputs store paths as UTF-8 text), its
      path shown with ``\\xNN`` escapes.
    """
    sources: list[MediaSource] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    as_sequence = sampling.images_as == "sequence"
    follow_all = sampling.follow_links

    def not_processed(p: Path, kind: str, status: str, why: str) -> None:
        shown = display_path(p)
        # a link that is not followed is listed as itself (its target may be listed too)
        sid = _link_id(p) if os.path.islink(p) else source_id_for(p)
        if sid in seen:
            return
        seen.add(sid)
        rows.append(row_for(shown, kind, status, f"{shown}: {why}") | {"source_id": sid})

    def bad_name(p: Path, kind: str) -> bool:
        if display_path(p) == str(p):
            return False
        not_processed(p, kind, "failed", "the name is not valid UTF-8 (outputs store paths as UTF-8 text); rename it")
        return True

    def add_file(p: Path, kind: str) -> None:
        if bad_name(p, kind):
            return
        sid = source_id_for(p)
        if sid in seen:
            log.debug("%s: listed more than once; kept once", p)
            return
        if kind == "other":
            not_processed(p, "other", "skipped", f"not a media file (extension {p.suffix.lower() or 'none'!r})")
            return
        problem = _unreadable(p)
        if problem:
            not_processed(p, kind, "failed", problem)
            return
        seen.add(sid)
        sources.append(MediaSource(path=p, kind=kind, source_id=sid))

    def add_sequence(folder: Path, images: list[Path]) -> None:
        sid = source_id_for(folder)
        if sid in seen:
            return
        seen.add(sid)
        readable: list[Path] = []
        for img in images:
            if bad_name(img, "image"):
                continue
            problem = _unreadable(img)
            if problem:
                not_processed(img, "image", "failed", problem)
            else:
                readable.append(img)
        if readable:
            sources.append(
                MediaSource(path=folder, kind="image_sequence", source_id=sid, frames=tuple(readable),
                            fps=float(sampling.image_fps))
            )  # fmt: skip

    def add_folders(found: list[tuple[Path, list[_Entry], str | None]]) -> None:
        for folder, entries, problem in found:
            if problem:
                not_processed(folder, "other", "failed", problem)
                continue
            if bad_name(folder, "other"):
                continue
            images: list[Path] = []
            for e in entries:
                if e.why:
                    not_processed(e.path, e.kind, e.status, e.why)
                elif e.kind == "image" and as_sequence:
                    images.append(e.path)
                else:
                    add_file(e.path, e.kind)
            if images:
                add_sequence(folder, images)

    given: list[tuple[Path, os.stat_result | None, str]] = []
    for raw in inputs:
        p = Path(os.path.abspath(os.path.expanduser(str(raw))))
        try:
            given.append((p, os.stat(p), ""))
        except FileNotFoundError:
            given.append((p, None, "broken symbolic link" if os.path.lexists(p) else "no such file or directory"))
        except OSError as e:
            given.append((p, None, f"cannot stat ({e.strerror or e})"))
    walker = _Walker([p for p, st, _ in given if st is not None and stat.S_ISDIR(st.st_mode)], follow_all)
    for p, st, why in given:  # in the order given; folders reached through links come last
        if st is None:
            not_processed(p, _kind_or_other(p), "failed", why)
        elif stat.S_ISDIR(st.st_mode):
            add_folders(walker.walk(p, st))
        elif stat.S_ISREG(st.st_mode):
            add_file(p, media_kind(p))
        else:
            not_processed(p, "other", "skipped", f"{_special_kind(st.st_mode)}; not read")
    add_folders(walker.follow_links())
    return sources, rows


def _link_id(p: Path) -> str:
    """The id of a symbolic link itself (its folder resolved, its name kept)."""
    own = Path(os.path.realpath(p.parent)) / p.name
    return hashlib.sha1(str(own).encode("utf-8", "surrogateescape")).hexdigest()[:_ID_LEN]


def _kind_or_other(p: Path) -> str:
    """Kind of a path that cannot be looked at: by extension (a folder name has none)."""
    return media_kind(p)


class _Entry:
    """A file found in a folder: its kind, and a status and reason when it is not read."""

    __slots__ = ("path", "kind", "status", "why")

    def __init__(self, path: Path, kind: str, status: str = "", why: str = ""):
        self.path, self.kind, self.status, self.why = path, kind, status, why


class _Walker:
    """Depth-first walk of the input folders in natural name order, each folder once by
    ``(st_dev, st_ino)``; symbolic links to folders are walked after the real folders of all
    roots (see :func:`discover`)."""

    def __init__(self, roots: list[Path], follow_all: bool):
        self.follow_all = follow_all
        self.roots = [os.path.realpath(r) for r in roots]  # the input folders, resolved
        self.visited: set[tuple[int, int]] = set()
        self.links: list[Path] = []  # links to folders, walked by follow_links()
        self.file_links: list[_Entry] = []  # links to files, listed by follow_links()
        self.order: list[tuple[Path, list[_Entry], str | None]] = []

    def walk(self, root: Path, st: os.stat_result) -> list[tuple[Path, list[_Entry], str | None]]:
        """(folder, entries, problem) of the real folders under ``root``, depth first."""
        self.order = []
        self._walk(root, st, self.links)
        return self.order

    def follow_links(self) -> list[tuple[Path, list[_Entry], str | None]]:
        """The folders reached through the symbolic links met so far (and links found there)."""
        self.order = []
        self._follow(self.links)
        self.links = []
        self.order += [(e.path.parent, [e], None) for e in self.file_links]
        self.file_links = []
        return self.order

    def _inside(self, real: str) -> bool:
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots)

    def _walk(self, folder: Path, st: os.stat_result, links: list[Path]) -> None:
        key = (st.st_dev, st.st_ino)
        if key in self.visited:
            log.debug("%s: folder already walked; not walked again", folder)
            return
        self.visited.add(key)
        try:
            with os.scandir(folder) as it:
                found = [e for e in it if not e.name.startswith(".")]
        except PermissionError:
            self.order.append((folder, [], "permission denied (cannot list folder)"))
            return
        except OSError as e:
            self.order.append((folder, [], f"cannot list folder ({e.strerror or e})"))
            return
        found.sort(key=lambda e: natural_key(e.name))
        entries: list[_Entry] = []
        subdirs: list[tuple[Path, os.stat_result]] = []
        for e in found:
            path = Path(e.path)
            try:
                if e.is_symlink():
                    entry = self._link(path, links)
                    if entry is not None:
                        entries.append(entry)
                    continue
                est = e.stat(follow_symlinks=False)
            except OSError as err:
                entries.append(_Entry(path, media_kind(path), "failed", f"cannot stat ({err.strerror or err})"))
                continue
            if stat.S_ISDIR(est.st_mode):
                subdirs.append((path, est))
            elif stat.S_ISREG(est.st_mode):
                entries.append(_Entry(path, media_kind(path)))
            else:
                entries.append(_Entry(path, "other", "skipped", f"{_special_kind(est.st_mode)}; not read"))
        self.order.append((folder, entries, None))
        for d, dst in subdirs:
            self._walk(d, dst, links)

    def _link(self, path: Path, links: list[Path]) -> _Entry | None:
        """A symbolic link in a folder: an entry to list now (a reason not to follow it), or
        None when it is queued (a folder in ``links``, a file in ``file_links``)."""
        kind = media_kind(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return _Entry(path, kind, "failed", "broken symbolic link")
        except OSError as err:  # ELOOP: a link that points to itself through links
            return _Entry(path, kind, "failed", f"unresolvable symbolic link ({err.strerror or err})")
        real = os.path.realpath(path)
        if not self.follow_all and not self._inside(real):
            what = "folder" if stat.S_ISDIR(st.st_mode) else "file"
            return _Entry(
                path, "other" if what == "folder" else kind, "skipped",
                f"symbolic link to the {what} {display_path(real)}, outside the input folders; not followed "
                "(--follow-links follows it)",
            )  # fmt: skip
        if stat.S_ISDIR(st.st_mode):
            parent = os.path.realpath(path.parent)
            if parent == real or parent.startswith(real.rstrip(os.sep) + os.sep):
                return _Entry(path, "other", "skipped", f"symbolic link loop (to its own ancestor folder {display_path(real)}); not followed")
            links.append(path)
            return None
        if stat.S_ISREG(st.st_mode):
            self.file_links.append(_Entry(path, kind))
            return None
        return _Entry(path, "other", "skipped", f"symbolic link to {_special_kind(st.st_mode)}; not read")

    def _follow(self, links: list[Path]) -> None:
        """Walk the folders that symbolic links name (each once; links found there are queued)."""
        while links:
            batch, links = links, []
            for path in batch:
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                self._walk(path, st, links)


def _unreadable(p: Path) -> str | None:
    """Why the regular file ``p`` cannot be read, or None. Opens it (permission bits lie for
    root) without blocking: a path that is not a regular file is never opened."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(p) else "no such file"
    except OSError as e:
        return f"cannot stat ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if not stat.S_ISREG(st.st_mode):
        return f"{_special_kind(st.st_mode)}; not read"
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        try:
            os.read(fd, 1)
        finally:
            os.close(fd)
    except PermissionError:
        return "permission denied"
    except OSError as e:
        return f"cannot read file ({e.strerror or e})"
    return None
