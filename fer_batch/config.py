"""Frozen, typed run configuration, passed down explicitly and stored with the outputs."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from fer_batch.errors import ConfigError


def parse_det_size(value: str | int | tuple[int, int]) -> tuple[int, int]:
    """``640`` -> (640, 640); ``"1280x736"`` -> (1280, 736) as (width, height). Multiples of 32."""
    if isinstance(value, tuple):
        w, h = value
    elif isinstance(value, int):
        w = h = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(value))
        if not m:
            raise ConfigError(f"--det-size: expected N or WxH (e.g. 640 or 1280x736), got {value!r}")
        w = int(m.group(1))
        h = int(m.group(2) or m.group(1))
    if w <= 0 or h <= 0 or w % 32 or h % 32:
        raise ConfigError(f"--det-size: width and height must be positive multiples of 32, got {w}x{h}")
    return (int(w), int(h))


@dataclass(frozen=True)
class SamplingConfig:
    """Which frames are analysed.

    ``fps`` samples by real per-frame timestamps (one frame per 1/fps seconds); ``every``
    takes every N-th decoded frame instead. Lower rates are faster but see short expressions
    less often.
    """

    fps: float | None = 2.0
    every: int | None = None
    start_s: float = 0.0
    end_s: float | None = None
    max_frames: int | None = None
    images_as: str = "files"  # files: each image its own source; sequence: a folder is one video
    image_fps: float = 1.0

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ConfigError(f"--every must be >= 1, got {self.every}")
        if self.fps is not None and self.fps <= 0:
            raise ConfigError(f"--fps must be > 0, got {self.fps}")
        if self.start_s < 0 or (self.end_s is not None and self.end_s <= self.start_s):
            raise ConfigError(f"--start/--end: need 0 <= start < end, got {self.start_s}/{self.end_s}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"--max-frames must be >= 1, got {self.max_frames}")
        if self.images_as not in ("files", "sequence"):
            raise ConfigError(f"--images-as: expected files|sequence, got {self.images_as!r}")
        if self.image_fps <= 0:
            raise ConfigError(f"--image-fps must be > 0, got {self.image_fps}")


@dataclass(frozen=True)
class DetectConfig:
    """Face detection.

    ``det_thresh``: raising it drops doubtful faces (fewer false positives, more misses).
    ``min_face``: faces whose box is smaller (shorter side, pixels) are dropped.
    ``det_size``: the detector's input canvas (width, height); larger finds smaller faces
    but costs time roughly in proportion to its area.
    """

    pack: str | None = None  # None: the default pack; else a pack directory (e.g. buffalo_l)
    det_size: tuple[int, int] = (640, 640)
    det_thresh: float = 0.5
    min_face: float = 16.0
    nms_thresh: float = 0.4
    max_faces: int = 0  # 0 = no limit

    def __post_init__(self) -> None:
        object.__setattr__(self, "det_size", parse_det_size(self.det_size))
        if not 0.0 < self.det_thresh < 1.0:
            raise ConfigError(f"--det-thresh must be in (0, 1), got {self.det_thresh}")
        if self.min_face < 0:
            raise ConfigError(f"--min-face must be >= 0, got {self.min_face}")


@dataclass(frozen=True)
class TrackConfig:
    """Tracking (see :class:`fer_batch.track.FaceTracker`).

    ``lost_s``: how long a track may go unseen and still take its face back by motion; longer
    bridges longer occlusions but lets another face that appears nearby inherit the id.
    ``match_thresh``: highest association cost (0..1) that continues a track; higher joins
    more (risk of id swaps), lower splits more. ``reid_thresh``: cosine similarity an
    embedding needs to re-identify an ended track; higher merges fewer different people but
    gives returning faces new ids more often.
    """

    lost_s: float = 3.0
    match_thresh: float = 0.8
    reid: str = "auto"  # auto: use the pack's recognition model if it has one; off; on
    reid_thresh: float = 0.5

    def __post_init__(self) -> None:
        if self.reid not in ("auto", "on", "off"):
            raise ConfigError(f"--reid: expected auto|on|off, got {self.reid!r}")
        if not self.lost_s > 0:
            raise ConfigError(f"--lost-s must be > 0, got {self.lost_s}")
        if not 0.0 < self.match_thresh <= 1.0:
            raise ConfigError(f"track match_thresh must be in (0, 1], got {self.match_thresh}")
        if not -1.0 <= self.reid_thresh <= 1.0:
            raise ConfigError(f"--reid-thresh must be a cosine similarity in [-1, 1], got {self.reid_thresh}")


@dataclass(frozen=True)
class ClassifyConfig:
    model: str | None = None  # None: the registry's default emotion model; a name or a path
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tta: bool | None = None  # None: follow the model card
    smooth_s: float = 0.0  # temporal smoothing window per track (0 = off)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device: expected auto|cpu|cuda[:N], got {self.device!r}")
        if self.smooth_s < 0:
            raise ConfigError(f"--smooth must be >= 0, got {self.smooth_s}")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: embedded local instance
    num_workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    segment_s: float = 300.0
    dashboard: bool = False


@dataclass(frozen=True)
class RunConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    runner: str = "local"  # local | ray
    # CPU threads per worker: model sessions' intra-op pools, the video decoder and OpenCV
    # (0 = each library's default, about one per core)
    threads: int = 0
    prefetch: int = 3  # frames decoded ahead in a background thread (0 or 1: one ahead)
    models_dir: str | None = None

    def __post_init__(self) -> None:
        if self.runner not in ("local", "ray"):
            raise ConfigError(f"--runner: expected local|ray, got {self.runner!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **section_changes: dict[str, Any]) -> "RunConfig":
        """``cfg.replace(detect={"det_size": 1024})``: a copy with fields of sections changed."""
        kw = {}
        for section, changes in section_changes.items():
            cur = getattr(self, section)
            kw[section] = dataclasses.replace(cur, **changes) if dataclasses.is_dataclass(cur) else changes
        return dataclasses.replace(self, **kw)
