"""One reader for every kind of source: videos, single images, image sequences.

Videos are streamed: one decoded frame at a time, never the whole file. The frame times of the
whole video are read when it is opened, the sampling plan is computed from them once
(``sampling.sample_indices``), and a decoder backend (:mod:`fer_batch.io.decoders`: PyAV or
decord, ``SamplingConfig.decoder``) delivers the planned frames, upright (rotation metadata
applied) and in BGR.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from fer_batch.config import SamplingConfig
from fer_batch.errors import DecodeError
from fer_batch.io.decoders import SEEKABLE_EXTS, choose_decoder, probe, sampling_interval_frames
from fer_batch.io.images import check_nonempty_file, image_size, read_image
from fer_batch.io.sampling import sample_indices
from fer_batch.types import Frame, MediaSource

log = logging.getLogger(__name__)

def can_seek(path: str | Path) -> bool:
    """Whether frame-exact seeking is trusted for this file's container.

    Where it is not (MPEG-PS, ASF/WMV, MPEG-TS, FLV, ...), a reader decodes from the start up
    to its first frame, so splitting such a video into time segments costs more than it saves.
    """
    return Path(path).suffix.lower() in SEEKABLE_EXTS


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
        decoder: the video backend used (``pyav`` or ``decord``), ``decoder_reason`` why.
        scale: decoded size / stored size (< 1 when ``max_frame_pixels`` scaled frames down);
            ``source_width``, ``source_height``: the stored (upright) size.
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
        self._dec = None  # the video decoder backend
        self._first: np.ndarray | None = None  # a single image, decoded by open()
        self._opened = False
        self._seek = False
        self._keys: list[int] = []
        self._decode_s = 0.0
        self.decoder: str | None = None
        self.decoder_reason: str | None = None
        self.scale = 1.0
        self.frames_decoded: int | None = None  # frames the PyAV backend decoded (after close)
        self.source_width: int | None = None
        self.source_height: int | None = None

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
    def decode_s(self) -> float:
        """Wall seconds spent decoding (for benchmarks)."""
        return self._decode_s + (self._dec.decode_s if self._dec is not None else 0.0)

    @decode_s.setter
    def decode_s(self, value: float) -> None:
        self._decode_s = value - (self._dec.decode_s if self._dec is not None else 0.0)

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
            self._decode_s += time.perf_counter() - t0
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
        if self._dec is not None:
            self._dec.close()
            self._decode_s += self._dec.decode_s
            self.frames_decoded = getattr(self._dec, "frames_decoded", None)
        self._dec = None
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

        t0 = time.perf_counter()
        info = probe(path)  # container header only (a few ms)
        name, why = choose_decoder(self.sampling.decoder, self.sampling, info)
        if self.allow_seek is None:
            self._seek = path.suffix.lower() in SEEKABLE_EXTS
        else:
            self._seek = bool(self.allow_seek)
        max_px = int(self.sampling.max_frame_pixels)
        if name == "pyav":
            from fer_batch.io.decode_pyav import PyAVDecoder

            dec = PyAVDecoder(path, threads=self.threads, seek=self._seek, max_pixels=max_px)
        else:
            from fer_batch.io.decode_decord import DecordDecoder

            coded = (info.width, info.height) if info is not None and info.width and info.height else None
            dec = DecordDecoder(path, threads=self.threads, seek=self._seek, max_pixels=max_px, coded_size=coded)
        self._decode_s += time.perf_counter() - t0
        dec.open()
        self._dec = dec
        self.decoder, self.decoder_reason = name, why
        self._timestamps = dec.timestamps
        self.frame_count = dec.frame_count
        self.native_fps = dec.native_fps
        self.duration_s = dec.duration_s
        self._keys = list(dec.key_indices)
        self._plan = sample_indices(self._timestamps, self.sampling, self.segment)
        if name == "pyav":
            # a substitute for a planned frame the decoder does not return: within half a
            # sampling interval of it (exact frames only when every frame is sampled)
            every = sampling_interval_frames(self.sampling, self.native_fps)
            dec.tolerance_s = 0.0 if every < 2 or not self.native_fps else 0.5 * every / self.native_fps
        self.width, self.height = dec.start(self._plan)
        if info is not None and info.width and info.height:
            sw, sh = info.width, info.height
            if (self.width > self.height) != (sw > sh) and sw != sh:
                sw, sh = sh, sw  # rotated by 90/270 degrees
            self.source_width, self.source_height = int(sw), int(sh)
            self.scale = self.width / float(sw) if sw else 1.0
        else:
            self.source_width, self.source_height = self.width, self.height
        if self.scale < 0.999:
            log.warning(
                "%s: %dx%d frames exceed --max-frame-pixels %d; decoding at %dx%d", path, self.source_width,
                self.source_height, max_px, self.width, self.height,
            )
        log.debug("%s: decoder %s (%s)", path, name, why)

    def _iter_video(self) -> Iterator[Frame]:
        if self._dec is None:
            raise DecodeError(f"{self.path}: reader is closed")
        for idx, ts, img in self._dec.frames():
            yield Frame(index=int(idx), timestamp_s=float(ts), image=img)

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
