"""Dataclasses that flow between pipeline stages.

Conventions: images are ``uint8`` arrays of shape (H, W, 3) in **BGR** order (OpenCV and
InsightFace's convention); boxes are ``xyxy`` pixels of the full-resolution,
orientation-applied frame; keypoints are 5 (x, y) pairs in InsightFace's order (left eye,
right eye, nose, left mouth corner, right mouth corner; "left" = image left).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fer_batch.errors import FerBatchError

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def _check(name: str, arr: np.ndarray, shape: tuple, dtype=None) -> np.ndarray:
    """Check ``arr`` against ``shape`` (``None`` = any size). Raise with expected vs actual."""
    arr = np.asarray(arr) if dtype is None else np.asarray(arr, dtype=dtype)
    ok = arr.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, arr.shape))
    if not ok:
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise FerBatchError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    return arr


@dataclass(frozen=True)
class MediaSource:
    """One input: a video file, a single image, or a folder of images read as one sequence.

    Attributes:
        path: the file (or folder, for ``kind == "image_sequence"``).
        kind: ``"video"``, ``"image"`` or ``"image_sequence"``.
        source_id: stable id of the input (a hash of its resolved path).
        frames: for ``image_sequence``, the ordered image files.
        fps: for ``image_sequence``, the frame rate the images are read at.
    """

    path: Path
    kind: str
    source_id: str
    frames: tuple[Path, ...] = ()
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("video", "image", "image_sequence"):
            raise FerBatchError(f"MediaSource.kind: expected video|image|image_sequence, got {self.kind!r}")


@dataclass(frozen=True)
class Frame:
    """One decoded, sampled frame."""

    index: int  # 0-based frame number in the source
    timestamp_s: float  # presentation time of the frame
    image: np.ndarray  # (H, W, 3) uint8 BGR, orientation applied

    def __post_init__(self) -> None:
        _check("Frame.image", self.image, (None, None, 3))
        if self.image.dtype != np.uint8:
            raise FerBatchError(f"Frame.image: expected uint8, got {self.image.dtype}")


@dataclass
class FaceDetections:
    """Faces of one or more frames as parallel arrays (one entry per face).

    ``track_id`` is -1 until a tracker assigns ids; ``probs`` is empty (0, 7) until the
    classifier fills it.
    """

    frame_index: np.ndarray  # (N,) int64
    timestamp_s: np.ndarray  # (N,) float64
    xyxy: np.ndarray  # (N, 4) float32
    det_score: np.ndarray  # (N,) float32
    kps: np.ndarray  # (N, 5, 2) float32
    track_id: np.ndarray = field(default=None)  # (N,) int64
    probs: np.ndarray = field(default=None)  # (N, 7) float32 in EMOTIONS order, or (0, 7)

    def __post_init__(self) -> None:
        n = len(np.asarray(self.det_score).reshape(-1))
        self.frame_index = _check("frame_index", self.frame_index, (n,), np.int64)
        self.timestamp_s = _check("timestamp_s", self.timestamp_s, (n,), np.float64)
        self.xyxy = _check("xyxy", np.asarray(self.xyxy, np.float32).reshape(-1, 4), (n, 4), np.float32)
        self.det_score = _check("det_score", self.det_score, (n,), np.float32)
        self.kps = _check("kps", np.asarray(self.kps, np.float32).reshape(-1, 5, 2), (n, 5, 2), np.float32)
        if self.track_id is None:
            self.track_id = np.full(n, -1, np.int64)
        self.track_id = _check("track_id", self.track_id, (n,), np.int64)
        if self.probs is None:
            self.probs = np.zeros((0, len(EMOTIONS)), np.float32)
        self.probs = np.asarray(self.probs, np.float32)
        if self.probs.shape not in ((0, len(EMOTIONS)), (n, len(EMOTIONS))):
            raise FerBatchError(f"probs: expected shape ({n}, 7) or (0, 7), got {self.probs.shape}")

    def __len__(self) -> int:
        return len(self.det_score)

    @classmethod
    def empty(cls) -> "FaceDetections":
        return cls(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))

    @classmethod
    def concat(cls, parts: list["FaceDetections"]) -> "FaceDetections":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        has_probs = all(len(p.probs) == len(p) for p in parts)
        return cls(
            frame_index=np.concatenate([p.frame_index for p in parts]),
            timestamp_s=np.concatenate([p.timestamp_s for p in parts]),
            xyxy=np.concatenate([p.xyxy for p in parts]),
            det_score=np.concatenate([p.det_score for p in parts]),
            kps=np.concatenate([p.kps for p in parts]),
            track_id=np.concatenate([p.track_id for p in parts]),
            probs=np.concatenate([p.probs for p in parts]) if has_probs else None,
        )

    def select(self, mask_or_index) -> "FaceDetections":
        """A subset, by boolean mask or integer index."""
        return FaceDetections(
            frame_index=self.frame_index[mask_or_index],
            timestamp_s=self.timestamp_s[mask_or_index],
            xyxy=self.xyxy[mask_or_index],
            det_score=self.det_score[mask_or_index],
            kps=self.kps[mask_or_index],
            track_id=self.track_id[mask_or_index],
            probs=self.probs[mask_or_index] if len(self.probs) == len(self) else None,
        )

    def with_(self, **changes) -> "FaceDetections":
        return replace(self, **changes)
