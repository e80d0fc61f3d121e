"""decord backend: decodes every frame, converts only the planned ones.

Frames between planned ones go through ``VideoReader.skip_frames``, which decodes them
without colour conversion or copying, and jumps to the last keyframe before the target when
the gap crosses one (only for containers whose seeking we verified to land on the exact frame;
others are read strictly in order).

Rotation: decord 0.6.0 itself applies the stream's rotation (the ``rotate`` tag or the display
matrix, 90/180/270 degrees) when decoding on the CPU, so frames arrive upright.
"""

from __future__ import annotations

import bisect
import logging
import time
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from fer_batch.errors import DecodeError
from fer_batch.io.decoders import capped_size, clean_error, environment_error, open_failure_reason

log = logging.getLogger(__name__)

_decord = None
_MAX_RETRIES = 8  # re-opens per source after decode errors (each costs an open + a seek)


def import_decord():
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


class DecordDecoder:
    """See the module docstring. ``seek``: trust keyframe seeks (container-dependent)."""

    name = "decord"

    def __init__(self, path: Path, *, threads: int = 0, seek: bool = True, max_pixels: int | None = None,
                 coded_size: tuple[int, int] | None = None) -> None:
        self.path = Path(path)
        self.threads = int(threads)
        self._seek = bool(seek)
        self.max_pixels = max_pixels
        self._size_kw: dict = {}
        if coded_size and max_pixels and coded_size[0] * coded_size[1] > max_pixels:
            w, h = capped_size(coded_size[0], coded_size[1], max_pixels)
            self._size_kw = {"width": w, "height": h}
        self.timestamps = np.zeros(0)
        self.duration_s = 0.0
        self.native_fps: float | None = None
        self.frame_count = 0
        self.decode_s = 0.0
        self._vr = None
        self._keys: list[int] = []
        self._plan: list[int] = []
        self._first: np.ndarray | None = None
        self._pos = 0

    @property
    def key_indices(self) -> list[int]:
        """Frame indices of the keyframes (from decord's index)."""
        return list(self._keys)

    def _new_reader(self):
        decord = import_decord()
        return decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=self.threads, **self._size_kw)

    def open(self) -> None:
        path = self.path
        t0 = time.perf_counter()
        try:
            vr = self._new_reader()
        except Exception as e:  # RuntimeError / DECORDError / AssertionError from decord
            raise DecodeError(f"{path}: {open_failure_reason(path, e, 'decord')}") from e
        n = len(vr)
        if n <= 0:
            raise DecodeError(f"{path}: no video frames found")
        try:
            pts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)
        except Exception as e:
            raise DecodeError(f"{path}: cannot read frame timestamps ({clean_error(e)})") from e
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
        self.timestamps = ts
        self.frame_count = n
        last_end = float(ends[-1]) if np.isfinite(ends[-1]) and ends[-1] > ts[-1] else float(ts[-1])
        self.duration_s = max(last_end, 0.0)
        self._vr = vr
        try:
            self._keys = sorted(int(k) for k in vr.get_key_indices())
        except Exception:
            self._keys = []
        self.decode_s += time.perf_counter() - t0

    def start(self, plan: np.ndarray) -> tuple[int, int]:
        """Decode frame 0: proves the stream decodes and gives the (rotated) frame size."""
        self._plan = [int(j) for j in plan]
        t0 = time.perf_counter()
        try:
            first = self._vr.next().asnumpy()
        except StopIteration as e:
            raise DecodeError(f"{self.path}: container holds no decodable video frame") from e
        except Exception as e:
            raise DecodeError(f"{self.path}: cannot decode the first frame ({clean_error(e)})") from e
        self.decode_s += time.perf_counter() - t0
        self._first = cv2.cvtColor(first, cv2.COLOR_RGB2BGR, dst=first)
        self._pos = 1
        return int(first.shape[1]), int(first.shape[0])

    def close(self) -> None:
        self._vr = None
        self._first = None

    def frames(self) -> Iterator[tuple[int, float, np.ndarray]]:
        if self._vr is None:
            raise DecodeError(f"{self.path}: reader is closed")
        vr = self._vr
        ts = self.timestamps
        last_ok: int | None = None
        retries = 0
        for j in self._plan:
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
                    if environment_error(e):  # out of memory, EIO: the machine's, not the stream's
                        raise
                    # decord's threaded decoder reports a bad packet some frames late (it reads
                    # ahead), losing the good frames in between, and where it fails depends on
                    # timing. Re-open and resume at ``j``: when even frame ``j`` cannot be
                    # reached the damage is really there; otherwise go on (a few tries).
                    if retries >= _MAX_RETRIES:
                        raise DecodeError(f"{self.path}: decoding failed {self._where(last_ok)} ({clean_error(e)})") from e
                    retries += 1
                    log.info("%s: decode error at frame %d; re-opening to resume there", self.path, j)
                    try:
                        vr = self._reopen_at(j)
                        img = vr.next().asnumpy()
                    except StopIteration:
                        return
                    except Exception as e2:
                        if environment_error(e2):
                            raise
                        raise DecodeError(f"{self.path}: decoding failed {self._where(last_ok)} ({clean_error(e2)})") from e2
                self._pos = j + 1
                img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR, dst=img)
            self.decode_s += time.perf_counter() - t0
            last_ok = j
            yield int(j), float(ts[j]), img

    def _where(self, last_ok: int | None) -> str:
        if last_ok is None:
            return "before any sampled frame"
        return f"after frame {last_ok} (t={self.timestamps[last_ok]:.2f}s)"

    def _reopen_at(self, j: int):
        """A fresh decoder positioned so that ``next()`` returns frame ``j``."""
        self._vr = None
        vr = self._new_reader()
        if self._seek:
            if j > 0:
                vr.seek_accurate(j)
            self._pos = j
        else:  # no trusted seeking: decode in order from the start
            self._pos = 0
            self._advance_to(vr, j)
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
