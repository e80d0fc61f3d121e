"""Video decoder backends behind one small interface, and the ``auto`` choice between them.

A backend opens one video, reports the presentation time of every frame (so the sampling plan
is computed up front, the same way for every backend), and then streams the planned frames as
upright BGR arrays, in order:

* ``decord`` (:mod:`fer_batch.io.decode_decord`): decodes every frame; skips the colour
  conversion of unplanned ones and lets decord jump to keyframes on containers whose seeks
  are exact.
* ``pyav`` (:mod:`fer_batch.io.decode_pyav`): never decodes a frame nobody needs. Frames that
  no other frame references (``skip_frame="NONREF"``) are skipped unless planned, and groups
  of pictures without a planned frame are not decoded at all (dropped at the demuxer, with a
  real keyframe seek on containers with a trusted index).

``auto`` picks from the sampling density and the stream's properties only (no timing probe,
no cache): PyAV for sparse sampling (an average of 2 or more source frames per sampled frame),
where it skips work, and for dense sampling too (``--every 1``), where both decode every frame
and PyAV measured faster in every round with bounded memory; decord whenever the stream lacks
what the PyAV path relies on (container timestamps: raw elementary streams).

Frame size cap: a decoded frame never exceeds ``max_pixels`` (``SamplingConfig.max_frame_pixels``);
larger streams are scaled down inside the decoder (the full-size picture is never converted to
BGR) and the reader reports the factor (``MediaReader.scale``).
"""

from __future__ import annotations

import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

log = logging.getLogger(__name__)

DECODERS = ("auto", "pyav", "decord")

# Default cap on decoded pixels per frame: DCI 4K (4096x2160) and everything smaller decode at
# full size; an 8K frame (33 MP, 100 MB as BGR) is scaled down to fit. Raising it costs memory
# roughly in proportion (about 3 bytes per pixel per frame held: decode-ahead queue, detector,
# crops); lowering it trades small faces for memory.
DEFAULT_MAX_FRAME_PIXELS = 4096 * 2160

# Containers whose keyframe seeks land on the exact frame: they carry a complete sample index.
# Verified frame for frame against sequential decoding in tests/test_io.py. On MPEG-PS (.mpg)
# and ASF (.wmv) decord's seeks were measured to land on wrong frames (even ``seek_accurate``),
# and MPEG-TS has no index: those are read in order, without any seek.
SEEKABLE_EXTS = frozenset({".mp4", ".m4v", ".mov", ".3gp", ".3g2", ".mkv", ".webm", ".avi"})


@dataclass(frozen=True)
class StreamInfo:
    """What the container header says about the first video stream (no decoding)."""

    codec: str
    width: int  # coded size, before rotation
    height: int
    frames: int  # from the header; 0 when unknown
    avg_fps: float | None
    has_pts: bool  # the container stores presentation timestamps (no raw elementary stream)


def capped_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(w, h) scaled down, aspect kept, to at most ``max_pixels`` pixels (even sizes)."""
    if not max_pixels or width * height <= max_pixels:
        return int(width), int(height)
    s = math.sqrt(max_pixels / float(width * height))
    w = max(2, int(width * s) // 2 * 2)
    h = max(2, int(height * s) // 2 * 2)
    return w, h


def probe(path: str | Path) -> StreamInfo | None:
    """The first video stream's header fields via PyAV (opens the container only); None if
    PyAV is missing or cannot open the file (the chosen backend then reports why)."""
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency
        return None
    try:
        with av.open(str(path), metadata_errors="ignore") as c:
            if not c.streams.video:
                return None
            s = c.streams.video[0]
            cc = s.codec_context
            rate = s.average_rate or s.guessed_rate
            fmt = (c.format.name or "") if c.format else ""
            return StreamInfo(
                codec=str(cc.name or ""),
                width=int(cc.width or 0),
                height=int(cc.height or 0),
                frames=int(s.frames or 0),
                avg_fps=float(rate) if rate else None,
                has_pts=not any(x in fmt.split(",") for x in ("h264", "hevc", "mjpeg", "rawvideo", "m4v", "mpegvideo")),
            )
    except Exception:  # noqa: BLE001 - any failure: let the backend give the reason
        return None


def sampling_interval_frames(sampling, avg_fps: float | None) -> float:
    """Average number of source frames per sampled frame (1.0 = every frame)."""
    if sampling.every is not None:
        return float(sampling.every)
    if sampling.fps is None:
        return 1.0
    if not avg_fps or avg_fps <= 0:
        return 1.0
    return max(1.0, avg_fps / float(sampling.fps))


def choose_decoder(requested: str, sampling, info: StreamInfo | None) -> tuple[str, str]:
    """(backend name, why). ``requested`` is ``auto``, ``pyav`` or ``decord``."""
    if requested != "auto":
        return requested, "requested"
    if info is None:
        return "decord", "stream not probed by PyAV"
    if not info.has_pts:
        return "decord", "raw elementary stream without presentation timestamps"
    every = sampling_interval_frames(sampling, info.avg_fps)
    if every < 2.0:
        # dense: both decode every frame; PyAV was the faster in every measured round and its
        # memory is bounded (decord decodes ahead without limit when the consumer is slow:
        # 4.9 GB peak for 5 s of 720p at --every 1 in the pipeline, 0.55 GB with PyAV)
        return "pyav", f"dense sampling ({every:.2g} source frames per sampled frame): PyAV decodes faster"
    return "pyav", f"sparse sampling ({every:.3g} source frames per sampled frame)"


class VideoDecoder(Protocol):
    """One open video. ``open`` reads the frame times; ``frames`` streams planned frames."""

    name: str
    timestamps: np.ndarray  # presentation time (s) of every frame, in presentation order
    duration_s: float
    native_fps: float | None
    frame_count: int
    decode_s: float

    def open(self) -> None: ...

    def start(self, plan: np.ndarray) -> tuple[int, int]:
        """Decode the first planned frame (frame 0 for an empty plan): proves the stream
        decodes; returns the (width, height) frames will have. Raises DecodeError."""

    def frames(self) -> Iterator[tuple[int, float, np.ndarray]]:
        """(index, timestamp, BGR image) of the planned frames, in order; DecodeError when
        the stream breaks off (after yielding every frame before the damage)."""

    def close(self) -> None: ...


# ---------------------------------------------------------------------------- error messages
_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\]\s+\S+:\d+:\s*")


# errno values that say the machine, not the media, failed (I/O error, out of memory, a
# vanished network file): never a reason to call a source ``partial``.
_ENVIRONMENT_ERRNOS = frozenset({5, 6, 12, 19, 28, 116, 122})  # EIO ENXIO ENOMEM ENODEV ENOSPC ESTALE EDQUOT


def environment_error(e: BaseException) -> bool:
    """Whether a decoder's exception is the environment's (I/O, memory), not the stream's.

    Decoders re-raise these as they are instead of turning them into a ``DecodeError``, so the
    pipeline records the source as ``failed`` (with the error's type) rather than ``partial``.
    """
    if isinstance(e, MemoryError):
        return True
    return isinstance(e, OSError) and getattr(e, "errno", None) in _ENVIRONMENT_ERRNOS


def clean_error(e: BaseException) -> str:
    """decord's messages carry log prefixes and C++ source locations; keep the reason."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = _LOG_PREFIX.sub("", msg)
    msg = msg.replace("Check failed: ", "")
    m = re.search(r"\((-?\d+) vs\. 0\)", msg)
    if m:
        code = int(m.group(1))
        names = {-1094995529: "AVERROR_INVALIDDATA", -541478725: "AVERROR_EOF", -5: "EIO", -12: "ENOMEM"}
        name = names.get(code, str(code))
        if "avcodec_send_packet" in msg:
            return f"the decoder rejected corrupt stream data ({name})"
        msg = msg.replace(m.group(0), f"(returned {name})")
    if "Invalid data found when processing input" in msg and "avcodec_send_packet" in msg:
        return "the decoder rejected corrupt stream data (AVERROR_INVALIDDATA)"
    return msg[:300]


def open_failure_reason(path: Path, e: BaseException | str, backend: str) -> str:
    """A human reason for ``backend`` failing to open ``path``."""
    detail = e if isinstance(e, str) else clean_error(e)
    if path.suffix.lower() in {".mp4", ".m4v", ".mov", ".3gp", ".3g2"}:
        why = mp4_structure_problem(path)
        if why:
            return f"not a readable video: {why} ({backend}: {detail})"
    return f"not a readable video ({backend}: {detail})"


def mp4_structure_problem(path: Path) -> str | None:
    """Look at an MP4/MOV's top-level boxes for the usual reasons it cannot be opened."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 8 or head[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
                return "no MP4/QuickTime header (random or foreign data)"
            pos, seen = 0, []
            while pos + 8 <= size:
                fh.seek(pos)
                hdr = fh.read(16)
                box_size, typ = struct.unpack(">I4s", hdr[:8])
                if box_size == 1 and len(hdr) >= 16:
                    box_size = struct.unpack(">Q", hdr[8:16])[0]
                elif box_size == 0:
                    box_size = size - pos
                if box_size < 8:
                    return f"corrupt box header at byte {pos}"
                seen.append(typ.decode("latin1"))
                if pos + box_size > size:
                    return (
                        f"file truncated: box '{typ.decode('latin1')}' needs {pos + box_size} bytes, file has {size}"
                    )
                pos += box_size
            if "moov" not in seen:
                return "no 'moov' index box: the file is truncated or was never finalised"
    except OSError:
        return None
    return None
