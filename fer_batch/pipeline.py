"""The per-source pipeline: decode -> detect -> track -> align -> classify -> rows.

Pure with respect to execution: no Ray import, no globals, no environment reads. The local
runner and the Ray runner both call :func:`process_source` with the same stage objects.
Every step reports through ``hook(step, payload)`` so progress bars and timing plug in
without touching this code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from fer_batch.config import RunConfig
from fer_batch.errors import DecodeError, FerBatchError
from fer_batch.io import MediaReader
from fer_batch.schema import FACES_SCHEMA, SourceRow, faces_to_table
from fer_batch.track import FaceTracker
from fer_batch.types import EMOTIONS, FaceDetections, MediaSource

log = logging.getLogger(__name__)

Hook = Callable[[str, dict], None]


def detector_threads(threads: int, device: str) -> int:
    """Intra-op threads of the detector's CPU session.

    ``threads`` > 0 is the user's budget, used as given. With the default (0) the decoder
    thread runs next to the detector all the time (``prefetch``), so the detector leaves it one
    core: on the 2-core benchmark box one detector thread costs 2 ms per 720p frame (20.2 vs
    18.0 ms) and the whole pipeline got 8% faster (60 s file at 2 fps, 3 interleaved runs:
    5.05 vs 5.50 s).
    """
    if threads > 0 or device.startswith("cuda"):
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores - 1)


def _no_hook(step: str, payload: dict) -> None:
    return None


@dataclass
class Stages:
    """The model-holding stages of a run. ``setup()`` loads models once; reuse across sources."""

    cfg: RunConfig
    device: str = "cpu"
    detector: Any = None
    classifier: Any = None
    embedder: Any = None  # FaceEmbedder of the pack's face_embedding card (re-identification)
    _ready: bool = False

    def setup(self) -> "Stages":
        if self._ready:
            return self
        from fer_batch.classify import EmotionClassifier
        from fer_batch.detect import FaceDetector

        c = self.cfg
        if c.threads > 0:
            # OpenCV's pool (resize/warp in detection and alignment) is process-wide; keep it
            # inside the thread budget like the model sessions and the decoder.
            import cv2

            cv2.setNumThreads(c.threads)
        self.detector = FaceDetector(c.detect, device=self.device, threads=detector_threads(c.threads, self.device),
                                     models_dir=c.models_dir)  # fmt: skip
        self.detector.setup()
        # The device was resolved once for the run; both stages get the same one.
        cls_cfg = dataclasses.replace(c.classify, device=self.device)
        self.classifier = EmotionClassifier(cls_cfg, threads=c.threads, models_dir=c.models_dir)
        self.classifier.setup()
        if c.track.reid != "off" and not self.detector.has_recognition:
            from fer_batch.embed import FaceEmbedder

            if FaceEmbedder.available(c.models_dir):
                self.embedder = FaceEmbedder(device=self.device, threads=c.threads, models_dir=c.models_dir).setup()
        self._ready = True
        return self

    def teardown(self) -> None:
        for s in (self.detector, self.classifier, self.embedder):
            if s is not None:
                s.teardown()
        self._ready = False

    @property
    def use_reid(self) -> bool:
        """Whether faces are embedded: the detector pack's recognition model, else the
        default pack's ``face_embedding`` model (``--reid auto``, the default)."""
        mode = self.cfg.track.reid
        if mode == "off":
            return False
        self.setup()
        ok = self.detector.has_recognition or self.embedder is not None
        if mode == "on" and not ok:
            raise FerBatchError("--reid on: neither the detector pack nor the model pack has a face embedding model")
        return ok

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings (N, D) of the faces with landmarks ``kps`` (N, 5, 2)."""
        if self.detector.has_recognition:
            return self.detector.embed(image, kps)
        return self.embedder(image, kps)

    def track_config(self):
        """``cfg.track`` with ``reid_thresh`` resolved (None: the embedding model's measured value)."""
        tc = self.cfg.track
        if tc.reid_thresh is None and self.embedder is not None and not self.detector.has_recognition:
            tc = dataclasses.replace(tc, reid_thresh=self.embedder.reid_thresh)
        return tc

    def models_info(self) -> dict[str, Any]:
        info = {"detector": self.detector.info, "classifier": self.classifier.info}
        if self.embedder is not None:
            info["embedder"] = self.embedder.info
        return info



@dataclass
class SourceResult:
    """What one source (or one segment of a video) produced.

    ``frame_times``: timestamps of the frames analysed, in order (a segment's runner counts
    the frames in its own range from them).
    """

    faces: pa.Table
    row: SourceRow
    segment: Optional[tuple[float, float]] = None
    frame_times: np.ndarray = field(default_factory=lambda: np.zeros(0))


def smooth_probs(track_id: np.ndarray, t: np.ndarray, probs: np.ndarray, window_s: float) -> np.ndarray:
    """Centred moving average of probabilities per track over ``window_s`` seconds of time.

    Uses real timestamps, so gaps in sampling are respected. Larger windows give steadier
    curves but blur short expressions.
    """
    out = np.empty_like(probs)
    half = window_s / 2.0
    for tid in np.unique(track_id):
        idx = np.flatnonzero(track_id == tid)
        idx = idx[np.argsort(t[idx], kind="stable")]
        tt = t[idx]
        cs = np.vstack([np.zeros((1, probs.shape[1])), np.cumsum(probs[idx], axis=0)])
        lo = np.searchsorted(tt, tt - half, side="left")
        hi = np.searchsorted(tt, tt + half, side="right")
        out[idx] = (cs[hi] - cs[lo]) / (hi - lo)[:, None]
    return out


_DONE = object()


def prefetch(iterable, depth: int = 3):
    """Iterate ``iterable`` in a background thread, at most ``depth`` items ahead.

    Decoding (FFmpeg inside decord) and inference (ONNX Runtime) both release the GIL, so the
    next frames decode while the current one is being detected. Memory stays bounded by
    ``depth`` frames. An exception raised by the iterable is re-raised here, in order, after
    the items that came before it.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_DONE, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((_DONE, e))

    t = threading.Thread(target=worker, name="fer-batch-decode", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is _DONE:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a worker waiting on a full queue, then let it finish
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.05)


class _Batcher:
    """Collects aligned crops across frames and classifies them in batches of ``batch_size``."""

    def __init__(self, classifier, batch_size: int):
        self.classifier = classifier
        self.batch_size = batch_size
        self.pending: list[tuple[FaceDetections, np.ndarray]] = []
        self.n_pending = 0
        self.done: list[FaceDetections] = []

    def add(self, dets: FaceDetections, crops: np.ndarray) -> None:
        if len(dets) == 0:
            return
        self.pending.append((dets, crops))
        self.n_pending += len(dets)
        if self.n_pending >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        crops = np.concatenate([c for _, c in self.pending])
        probs = self.classifier(crops)
        i = 0
        for dets, _ in self.pending:
            n = len(dets)
            self.done.append(dets.with_(probs=probs[i : i + n]))
            i += n
        self.pending, self.n_pending = [], 0


def _batched(items, n: int):
    """Lists of up to ``n`` items; on an error from ``items`` the items before it come first."""
    buf: list = []
    try:
        for x in items:
            buf.append(x)
            if len(buf) >= n:
                yield buf
                buf = []
    except Exception:
        if buf:
            yield buf
        raise
    if buf:
        yield buf


def process_source(
    source: MediaSource,
    stages: Stages,
    cfg: RunConfig,
    hook: Hook | None = None,
    segment: tuple[float, float] | None = None,
    tracker=None,
) -> SourceResult:
    """Run one source (or one time segment of a video) through every stage.

    Never raises for a bad input: the returned row says ``ok``, ``partial`` (decoding broke
    off after some frames; the rows before are kept) or ``failed``.
    """
    hook = hook or _no_hook
    t0 = time.perf_counter()
    stages.setup()
    tracker = tracker or FaceTracker(stages.track_config())
    use_reid = stages.use_reid
    batcher = _Batcher(stages.classifier, cfg.classify.batch_size)
    times: list[float] = []
    hook("source_start", {"source": source, "segment": segment})

    def done(row: SourceRow, table: pa.Table | None = None) -> SourceResult:
        hook("source_end", {"source": source, "row": row})
        table = FACES_SCHEMA.empty_table() if table is None else table
        return SourceResult(table, row, segment, np.asarray(times, np.float64))

    reader = MediaReader(source, cfg.sampling, segment=segment, threads=cfg.threads)
    try:
        reader.open()
    except FerBatchError as e:
        if isinstance(e, DecodeError):
            log.warning("%s", e)
        return done(SourceRow.failed(source, str(e), wall_s=time.perf_counter() - t0))
    duration_s = reader.duration_s
    hook("source_open", {"source": source, "duration_s": duration_s, "reader": reader})
    error: str | None = None
    fatal = False  # an error that is not the media's (see below): failed, not partial
    frames = prefetch(reader, depth=cfg.prefetch)
    # frames decoded smaller than stored (--max-frame-pixels): rows get stored-size pixels
    unscale = 1.0 / reader.scale if getattr(reader, "scale", 1.0) < 0.999 else None
    try:
        # one detector run per batch of frames on a GPU (detector.batch_size; 1 on CPU)
        for batch in _batched(frames, getattr(stages.detector, "batch_size", 1)):
            found = stages.detector.detect_batch(batch) if len(batch) > 1 else [stages.detector(batch[0])]
            for frame, dets in zip(batch, found):
                # embeddings on demand: only the faces the tracker needs them for
                embed = (lambda rows, im=frame.image, k=dets.kps: stages.embed(im, k[rows])) if use_reid else None
                dets = tracker.update(dets, frame.timestamp_s, embed=embed)
                if len(dets):
                    crops = stages.classifier.crops(frame.image, dets.kps)
                    if unscale:
                        dets = dets.with_(xyxy=dets.xyxy * unscale, kps=dets.kps * unscale)
                    batcher.add(dets, crops)
                times.append(frame.timestamp_s)
                hook("frame", {"source": source, "frame_index": frame.index, "timestamp_s": frame.timestamp_s, "faces": len(dets)})
    except DecodeError as e:
        # Decoding broke off: keep every row computed so far (none read at all: failed).
        error = str(e)
        log.warning("%s (kept %d frames before it)", e, len(times))
    except Exception as e:  # noqa: BLE001 - one bad item must never stop the batch
        # Anything else (ONNX Runtime, CUDA out of memory, an I/O error) is not a property of
        # the media: the source is failed (retried by --retry-failed, exit code 1), never partial.
        log.exception("%s: failed", source.path)
        error, fatal = f"{type(e).__name__}: {e}", True
    finally:
        frames.close()  # stops and joins the decode thread before the reader goes away
        reader.close()
    try:
        batcher.flush()  # the last batch: its error is this source's, never the run's
    except Exception as e:  # noqa: BLE001 - one bad item must never stop the batch
        log.exception("%s: classifying the last faces failed", source.path)
        error, fatal = (error if fatal else f"{type(e).__name__}: {e}"), True
    dets = FaceDetections.concat(batcher.done)  # the faces classified (all, unless an error)
    smoothed = None
    if cfg.classify.smooth_s > 0 and len(dets):
        smoothed = smooth_probs(dets.track_id, dets.timestamp_s, dets.probs, cfg.classify.smooth_s)
    table = faces_to_table(source.source_id, str(source.path), dets, smoothed)
    figures = dict(
        duration_s=duration_s, frames_sampled=len(times), faces=len(dets),
        tracks=int(len(np.unique(dets.track_id))), wall_s=time.perf_counter() - t0,
    )  # fmt: skip
    if error is None:
        row = SourceRow.ok(source, **figures)
    elif times and not fatal:  # only a decoder that broke off mid-stream
        row = SourceRow.partial(source, error, **figures)
    else:
        # a failed source leaves no rows (they would be an arbitrary prefix of the media)
        row = SourceRow.failed(source, error, **{**figures, "faces": 0, "tracks": 0})
        table = None
    return done(row, table)


__all__ = ["Stages", "SourceResult", "process_source", "smooth_probs", "EMOTIONS"]
