"""Face thumbnails at key moments, cut from the source media at report time.

Only used with ``fer-batch report --thumbnails`` (faces are personal data; the default report
holds none). Frames are read by ``source_path`` and the row's ``frame_index`` (the sampled
frame the timestamp belongs to): decord for videos, :func:`fer_batch.io.read_image` for images
(EXIF orientation applied).
A source that is missing or unreadable gives a note, never an exception.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

THUMB_PX = 96  # longest side of a thumbnail
MARGIN = 0.25  # box grown by this fraction on each side (some context around the face)


@dataclass(frozen=True)
class ThumbRequest:
    """One face to cut: which frame of the source, and where the face is."""

    frame_index: int
    time_s: float
    box: tuple[float, float, float, float]


def _sequence_files(folder: Path) -> list[Path]:
    """The frames of an image-sequence source, as ``fer-batch process`` orders them (images of
    the folder, hidden names skipped, natural name order)."""
    from fer_batch.io import media_kind, natural_key

    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and media_kind(p) == "image"]
    return sorted(files, key=lambda p: natural_key(p.name))


def _rgb(path: Path) -> np.ndarray:
    from fer_batch.io import read_image  # EXIF orientation, odd modes, size guard

    return read_image(path)[:, :, ::-1]


def iter_frames(path: Path, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, RGB frame) of ``path`` for the wanted indices, in increasing order, one
    decoded frame at a time (a full frame of an 8K video is 100 MB: the caller cuts its
    thumbnails and drops it before the next is decoded). decord applies the video's rotation
    itself, as in ``fer-batch process``, so boxes match. Indices outside the source are left out.
    """
    from fer_batch.io import media_kind

    wanted = sorted({int(i) for i in indices if i >= 0})
    if path.is_dir():
        files = _sequence_files(path)
        for i in wanted:
            if i < len(files):
                yield i, _rgb(files[i])
        return
    if media_kind(path) == "image":
        img = _rgb(path)
        for i in wanted:
            yield i, img
        return
    import decord  # imported lazily: only thumbnails of videos need it

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
    n = len(vr)
    for i in wanted:
        if i < n:
            yield i, vr[i].asnumpy()


def crop_thumbnail(frame: np.ndarray, box: tuple[float, float, float, float], px: int = THUMB_PX) -> str:
    """A face cut from an RGB frame (box grown by ``MARGIN``), at most ``px`` on its longest
    side, as a ``data:image/jpeg;base64,`` URI."""
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * MARGIN, (y2 - y1) * MARGIN
    a, b = int(max(0, np.floor(x1 - mx))), int(max(0, np.floor(y1 - my)))
    c, d = int(min(w, np.ceil(x2 + mx))), int(min(h, np.ceil(y2 + my)))
    if c <= a or d <= b:
        raise ValueError(f"face box {box} lies outside the {w}x{h} frame")
    im = Image.fromarray(np.ascontiguousarray(frame[b:d, a:c]))
    im.thumbnail((px, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def cut_thumbnails(source_path: str, requests: list[ThumbRequest], px: int = THUMB_PX) -> tuple[dict[int, str], str | None]:
    """Thumbnails for the requests of one source.

    Returns:
        (thumbnail data URI by request position, a note for the reader or None). Requests that
        could not be served are absent from the dict; the note says why.
    """
    path = Path(source_path)
    if not requests:
        return {}, None
    if not path.exists():
        return {}, f"source file not found at report time: {source_path} (thumbnails omitted)"
    by_frame: dict[int, list[int]] = {}
    for k, r in enumerate(requests):
        by_frame.setdefault(int(r.frame_index), []).append(k)
    out: dict[int, str] = {}
    failed = 0
    try:
        for i, frame in iter_frames(path, list(by_frame)):
            for k in by_frame[i]:
                try:
                    out[k] = crop_thumbnail(frame, requests[k].box, px)
                except ValueError as e:
                    log.warning("%s frame %d: %s", source_path, i, e)
                    failed += 1
            del frame  # only one decoded frame is alive at a time
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes a note, the report goes on
        log.warning("%s: cannot read frames for thumbnails: %s", source_path, e)
        if not out:
            return {}, f"cannot read {source_path} for thumbnails: {type(e).__name__}: {e}"
    missing = len(requests) - len(out)
    note = f"{missing} of {len(requests)} thumbnails could not be cut from {source_path}" if missing else None
    return out, note
