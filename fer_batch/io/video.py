"""One reader for every kind of source: videos (decord), single images, image sequences.

Videos are streamed: one decoded frame at a time, never the whole file. Which frames are
decoded is planned up front from decord's per-frame timestamps (``sampling.sample_indices``);
frames between planned ones are skipped with ``VideoReader.skip_frames``, which decodes them
without colour conversion or copying, and jumps to the last keyframe before the target when
the gap crosses one (only for containers whose seeking we verified to land on the exact frame;
others are read strictly in order).

Rotation: decord 0.6.0 itself applies the stream's rotation (the ``rotate`` tag or the display
matrix, 90/180/270 degrees) when decoding on the CPU, so frames arrive upright and are not
rotated again here. ``tests/test_io.py`` pins that behaviour on files with each rotation.
"""

from __future__ import annotations

import bisect
import logging
import re
import struct
import time
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from fer_batch.config import SamplingConfig
from fer_batch.errors import DecodeError
from fer_batch.io.images import check_nonempty_file, image_size, read_image
from fer_batch.io.sampling import sample_indices
from fer_batch.types import Frame, MediaSource

log = logging.getLogger(__name__)

# Containers whose keyframe seeks (inside ``skip_frames``) land on the exact frame: they
# carry a complete sample index. Verified frame-for-frame against sequential decoding in
# tests/test_io.py. On MPEG-PS (.mpg) and ASF (.wmv) decord's seeks were measured to land on
# wrong frames (even ``seek_accurate``), and MPEG-TS has no index: those are read in order,
# without any seek (see ``_advance_to``).
SEEKABLE_EXTS = frozenset({".mp4", ".m4v", ".mov", ".3gp", ".3g2", ".mkv", ".webm", ".avi"})



def can_seek(path: str | Path) -> bool:
    """Whether frame-exact seeking is trusted for this file's container.

    Where it is not (MPEG-PS, ASF/WMV, MPEG-TS, FLV, ...), a reader decodes from the start up
    to its first frame, so splitting such a video into time segments costs more than it saves.
    """
    return Path(path).suffix.lower() in SEEKABLE_EXTS


_decord = None
_MAX_RETRIES = 8  # re-opens per source after decode errors (each costs an open + a seek)


def _import_decord():
    """Import decord once and keep FFmpeg's own log lines (``header damaged``...) quiet:
    decode problems reach the user as DecodeError messages instead."""
    global _decord
    if _decord is None:
        import decord

        try:
            decord.logging.set_level(decord.logging.QUIET)
        except Exception:  # pragma: no cover - older decord without the logging module
            pass
        _decord = decord
    return _decord


class MediaReader:
    """Stream the sampled frames of one source (video, image, or image sequence).

    Usage::

        with MediaReader(source, sampling) as reader:   # open() raises DecodeError
            for frame in reader:                          # may raise DecodeError mid-way
                ...

    Attributes (valid after ``open``):
        duration_s: length in seconds (end of the last frame); None for a single image.
        native_fps: the container's average frame rate (an average: wrong on variable frame
            rate, which is why sampling uses per-frame timestamps); the sequence rate for
            image sequences; None for a single image.
        frame_count: frames in the source.
        width, height: frame size after rotation / EXIF orientation.
        planned_frames: how many frames iteration will yield if nothing fails.
    """

    def __init__(
        self,
        source: MediaSource,
        sampling: SamplingConfig,
        segment: tuple[float, float] | None = None,
        *,
        threads: int = 0,
        allow_seek: bool | None = None,
    ) -> None:
        """
        Args:
            source: what to read.
            sampling: which frames (see ``SamplingConfig``).
            segment: ``(t0, t1)``: only frames with ``t0 <= timestamp < t1`` of the global
                sampling plan (Ray splits long videos this way).
            threads: decoder threads (0 = FFmpeg's choice, about one per core). Set 1 when
                several readers share a machine.
            allow_seek: None = seek on containers in ``SEEKABLE_EXTS``; False = always decode
                in order; True = seek on any container.
        """
        self.source = source
        self.sampling = sampling
        self.segment = segment
        self.threads = int(threads)
        self.allow_seek = allow_seek
        self.duration_s: float | None = None
        self.native_fps: float | None = None
        self.frame_count: int | None = None
        self.width: int | None = None
        self.height: int | None = None
        self._plan: np.ndarray = np.zeros(0, np.int64)
        self._timestamps: np.ndarray = np.zeros(0)
        self._vr = None
        self._first: np.ndarray | None = None  # decoded frame 0 (BGR), kept from open()
        self._pos = 0  # index of the frame the decoder returns next
        self._opened = False
        self._seek = False
        self._keys: list[int] = []
        self.decode_s = 0.0  # wall seconds spent decoding (for benchmarks)

    # ------------------------------------------------------------------ lifecycle
    @property
    def path(self) -> Path:
        return Path(self.source.path)

    @property
    def planned_frames(self) -> int:
        return int(len(self._plan))

    @property
    def seeks_cheaply(self) -> bool:
        """Whether a reader of this source can start at a later frame without decoding from
        the start: a video whose container's seeking is trusted and that has a keyframe index
        with more than one keyframe, or an image sequence (valid after ``open``)."""
        if self.source.kind == "video":
            return bool(self._seek and len(self._keys) > 1)
        return self.source.kind == "image_sequence"

    @property
    def plan(self) -> np.ndarray:
        """Planned frame indices (read-only copy)."""
        return self._plan.copy()

    @property
    def timestamps(self) -> np.ndarray:
        """Presentation time (s) of every frame of the source."""
        return self._timestamps.copy()

    def open(self) -> "MediaReader":
        """Open the source and read its metadata.

        Raises:
            DecodeError: ``"<path>: <reason>"`` when it cannot be read at all.
        """
        if self._opened:
            return self
        kind = self.source.kind
        if kind == "video":
            self._open_video()
        elif kind == "image":
            # Decoding is the whole cost of an image: do it here, so that any problem makes
            # the source ``failed`` (not ``partial``) and iteration cannot fail.
            t0 = time.perf_counter()
            self._first = read_image(self.path)
            self.decode_s += time.perf_counter() - t0
            self.height, self.width = int(self._first.shape[0]), int(self._first.shape[1])
            self.frame_count = 1
            self._timestamps = np.zeros(1)
            self._plan = np.zeros(1, np.int64)  # a single image is always analysed
        else:  # image_sequence
            frames = tuple(self.source.frames)
            if not frames:
                raise DecodeError(f"{self.path}: image sequence has no images")
            fps = float(self.source.fps or self.sampling.image_fps)
            self.native_fps = fps
            self.frame_count = len(frames)
            self.duration_s = len(frames) / fps
            self._timestamps = np.arange(len(frames), dtype=np.float64) / fps
            self._plan = sample_indices(self._timestamps, self.sampling, self.segment)
            first = frames[int(self._plan[0])] if len(self._plan) else frames[0]
            self.width, self.height = image_size(first)  # header only; frames are read lazily
        self._opened = True
        return self

    def close(self) -> None:
        """Release the decoder (idempotent)."""
        self._vr = None
        self._first = None
        self._opened = False

    def __enter__(self) -> "MediaReader":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Frame]:
        if not self._opened:
            self.open()
        kind = self.source.kind
        if kind == "video":
            yield from self._iter_video()
        elif kind == "image":
            img, self._first = self._first, None
            if img is None:  # iterated twice
                img = read_image(self.path)
            yield Frame(index=0, timestamp_s=0.0, image=img)
        else:
            yield from self._iter_sequence()

    # ------------------------------------------------------------------ video
    def _open_video(self) -> None:
        path = self.path
        check_nonempty_file(path)
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except PermissionError as e:
            raise DecodeError(f"{path}: permission denied") from e
        except OSError as e:
            raise DecodeError(f"{path}: cannot read file ({e.strerror or e})") from e

        decord = _import_decord()
        t0 = time.perf_counter()
        try:
            vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=self.threads)
        except Exception as e:  # RuntimeError / DECORDError / AssertionError from decord
            raise DecodeError(f"{path}: {_open_failure_reason(path, e)}") from e
        n = len(vr)
        if n <= 0:
            raise DecodeError(f"{path}: no video frames found")
        try:
            pts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)
        except Exception as e:
            raise DecodeError(f"{path}: cannot read frame timestamps ({_clean(e)})") from e
        try:
            avg_fps = float(vr.get_avg_fps())
        except Exception:
            avg_fps = float("nan")
        self.native_fps = avg_fps if np.isfinite(avg_fps) and avg_fps > 0 else None
        ts = pts[:, 0]
        if not (np.all(np.isfinite(ts)) and np.all(np.diff(ts) >= 0) and ts[-1] > ts[0] - 1e-9 and ts[0] > -1.0):
            if self.native_fps is None:
                raise DecodeError(f"{path}: frame timestamps are unusable and the container gives no frame rate")
            log.warning("%s: frame timestamps unusable; using frame index / %.3f fps", path, self.native_fps)
            ts = np.arange(n, dtype=np.float64) / self.native_fps
            ends = ts + 1.0 / self.native_fps
        else:
            ends = pts[:, 1]
        self._timestamps = ts
        self.frame_count = n
        last_end = float(ends[-1]) if np.isfinite(ends[-1]) and ends[-1] > ts[-1] else float(ts[-1])
        self.duration_s = max(last_end, 0.0)
        # Decode frame 0: proves the stream decodes and gives the (rotated) frame size.
        try:
            first = vr.next().asnumpy()
        except StopIteration as e:
            raise DecodeError(f"{path}: container holds no decodable video frame") from e
        except Exception as e:
            raise DecodeError(f"{path}: cannot decode the first frame ({_clean(e)})") from e
        self.decode_s += time.perf_counter() - t0
        self.height, self.width = int(first.shape[0]), int(first.shape[1])
        self._first = cv2.cvtColor(first, cv2.COLOR_RGB2BGR, dst=first)
        self._pos = 1
        self._vr = vr
        try:
            self._keys = sorted(int(k) for k in vr.get_key_indices())
        except Exception:
            self._keys = []
        if self.allow_seek is None:
            self._seek = path.suffix.lower() in SEEKABLE_EXTS
        else:
            self._seek = bool(self.allow_seek)
        self._plan = sample_indices(self._timestamps, self.sampling, self.segment)

    def _iter_video(self) -> Iterator[Frame]:
        if self._vr is None:
            raise DecodeError(f"{self.path}: reader is closed")
        vr = self._vr
        ts = self._timestamps
        last_ok: int | None = None
        retries = 0
        for j in self._plan.tolist():
            t0 = time.perf_counter()
            if j == 0 and self._first is not None:
                img, self._first = self._first, None
            else:
                self._first = None  # not needed any more: free it
                try:
                    self._advance_to(vr, j)
                    img = vr.next().asnumpy()
                except StopIteration:
                    log.warning("%s: stream ended at frame %d before planned frame %d", self.path, self._pos, j)
                    self.decode_s += time.perf_counter() - t0
                    return
                except Exception as e:
                    self.decode_s += time.perf_counter() - t0
                    # decord's threaded decoder reports a bad packet some frames late (it reads
                    # ahead), losing the good frames in between, and where it fails depends on
                    # timing. Re-open and resume at ``j``: when even frame ``j`` cannot be
                    # reached the damage is really there; otherwise go on (a few tries).
                    if retries >= _MAX_RETRIES:
                        raise DecodeError(f"{self.path}: decoding failed {self._where(last_ok)} ({_clean(e)})") from e
                    retries += 1
                    log.info("%s: decode error at frame %d; re-opening to resume there", self.path, j)
                    try:
                        vr = self._reopen_at(j)
                        img = vr.next().asnumpy()
                    except StopIteration:
                        return
                    except Exception as e2:
                        raise DecodeError(f"{self.path}: decoding failed {self._where(last_ok)} ({_clean(e2)})") from e2
                self._pos = j + 1
                img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR, dst=img)
            self.decode_s += time.perf_counter() - t0
            last_ok = j
            yield Frame(index=int(j), timestamp_s=float(ts[j]), image=img)

    def _where(self, last_ok: int | None) -> str:
        if last_ok is None:
            return "before any sampled frame"
        return f"after frame {last_ok} (t={self._timestamps[last_ok]:.2f}s)"

    def _reopen_at(self, j: int):
        """A fresh decoder positioned so that ``next()`` returns frame ``j``."""
        decord = _import_decord()
        self._vr = None
        try:
            vr = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=self.threads)
            if self._seek:
                if j > 0:
                    vr.seek_accurate(j)
                self._pos = j
            else:  # no trusted seeking: decode in order from the start
                self._pos = 0
                self._advance_to(vr, j)
        except Exception:
            self._vr = None
            raise
        self._vr = vr
        return vr

    def _advance_to(self, vr, j: int) -> None:
        """Position the decoder so that ``next()`` returns frame ``j``."""
        if j < self._pos:  # never happens with a sorted plan; stay correct anyway
            vr.seek_accurate(j)
            self._pos = j
            return
        if self._seek:
            if j > self._pos:
                vr.skip_frames(j - self._pos)  # seeks to the last keyframe <= j if the gap crosses one
            self._pos = j
            return
        # In order, without any seek: ``skip_frames`` seeks as soon as a skip crosses a
        # keyframe, so skip up to the frame before each keyframe and decode that one frame
        # with ``next()`` (one colour conversion per GOP; every other frame is only decoded).
        keys = self._keys
        pos = self._pos
        while pos < j:
            k = bisect.bisect_right(keys, pos)
            key = keys[k] if k < len(keys) else None
            if key is not None and key <= j:
                if key - 1 > pos:
                    vr.skip_frames(key - 1 - pos)
                vr.next()
                pos = key
            else:
                vr.skip_frames(j - pos)
                pos = j
            self._pos = pos

    # ------------------------------------------------------------------ image sequence
    def _iter_sequence(self) -> Iterator[Frame]:
        frames = self.source.frames
        errors: list[str] = []
        for j in self._plan.tolist():
            t0 = time.perf_counter()
            try:
                img = read_image(frames[j])
            except DecodeError as e:
                self.decode_s += time.perf_counter() - t0
                log.warning("%s", e)
                errors.append(str(e))
                continue
            self.decode_s += time.perf_counter() - t0
            yield Frame(index=int(j), timestamp_s=float(self._timestamps[j]), image=img)
        if errors:
            raise DecodeError(
                f"{self.path}: {len(errors)} of {len(self._plan)} images unreadable (first: {errors[0]})"
            )


# ---------------------------------------------------------------------- error messages
_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\]\s+\S+:\d+:\s*")


def _clean(e: BaseException) -> str:
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
    return msg[:300]


def _open_failure_reason(path: Path, e: BaseException) -> str:
    """A human reason for decord failing to open ``path``."""
    detail = _clean(e)
    if path.suffix.lower() in {".mp4", ".m4v", ".mov", ".3gp", ".3g2"}:
        why = _mp4_structure_problem(path)
        if why:
            return f"not a readable video: {why} (decord: {detail})"
    return f"not a readable video (decord: {detail})"


def _mp4_structure_problem(path: Path) -> str | None:
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
