"""Frozen, typed run configuration, passed down explicitly and stored with the outputs."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fer_batch.errors import ConfigError

# How to add an option: give the config field ``metadata=opt("cli_name")``. The Python API
# (``config_from_options``) accepts it under that name, ``fer-batch process`` must declare a
# parameter of the same name (``tests/test_options.py`` checks names and defaults), and it is
# recorded in the outputs' metadata with the rest of the configuration.
_OPTION = "option"


REID_MODES = ("auto", "on", "off")
RUNNERS = ("local", "ray")
# --source-timeout auto: 5 minutes, plus 2 s per second of media and 1 s per sampled frame
# (at the default 2 fps: 4 s per second of video, 20 to 40 times what a 2-core CPU needs).
AUTO_TIMEOUT_BASE_S = 300.0
AUTO_TIMEOUT_PER_MEDIA_S = 2.0
AUTO_TIMEOUT_PER_FRAME_S = 1.0


def _parse_source_timeout(value: Any) -> str:
    """``auto`` | ``off`` (also ``0``, ``none``) | a positive number of seconds, as a string."""
    s = str(value).strip().lower()
    if s in ("auto", ""):
        return "auto"
    if s in ("off", "none", "no", "0", "0.0"):
        return "off"
    try:
        v = float(s)
    except ValueError:
        raise ConfigError(f"--source-timeout: expected auto, off or seconds, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"--source-timeout: expected auto, off or a positive number of seconds, got {value!r}")
    return repr(v) if v != int(v) else str(int(v))


def opt(name: str) -> dict[str, str]:
    """Field metadata exposing a config field as the user option ``name`` (``--name-with-dashes``)."""
    return {_OPTION: name}


# --det-size auto: the detector canvas has this long side and the frame's aspect ratio
AUTO_DET_SIDE = 640


def fit_det_size(height: int, width: int, side: int = AUTO_DET_SIDE) -> tuple[int, int]:
    """(width, height) of a detector canvas whose long side is ``side`` and whose short side
    holds the frame scaled by the same factor, rounded up to a multiple of 32.

    The frame is resized exactly as on a ``side x side`` canvas (InsightFace keeps the aspect
    ratio and pads the rest); only the padding, which holds no face and costs as much as
    image, is left out: 640x384 instead of 640x640 for 16:9 video.
    """
    h, w = max(1, int(height)), max(1, int(width))
    scale = side / max(h, w)

    def up(v: float) -> int:
        return max(32, int(math.ceil(round(v, 6) / 32.0)) * 32)

    return (up(w * scale), up(h * scale))


def parse_det_size(value: str | int | tuple[int, int]) -> tuple[int, int] | str:
    """``auto`` -> "auto" (see ``fit_det_size``); ``640`` -> (640, 640); ``"1280x736"`` ->
    (1280, 736) as (width, height). Multiples of 32."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, (tuple, list)):
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

    fps: float | None = field(default=2.0, metadata=opt("fps"))
    every: int | None = field(default=None, metadata=opt("every"))
    start_s: float = field(default=0.0, metadata=opt("start"))
    end_s: float | None = field(default=None, metadata=opt("end"))
    max_frames: int | None = field(default=None, metadata=opt("max_frames"))
    images_as: str = field(default="files", metadata=opt("images_as"))  # files: each image its own source; sequence: a folder is one video
    image_fps: float = field(default=1.0, metadata=opt("image_fps"))
    # video decoder backend: auto (PyAV; decord for raw streams without timestamps) | pyav | decord
    decoder: str = field(default="auto", metadata=opt("decoder"))
    # decoded pixels per video frame at most; larger streams are scaled down in the decoder
    # (default: DCI 4K, 4096x2160). Higher keeps smaller faces of 8K video and costs memory.
    max_frame_pixels: int = field(default=4096 * 2160, metadata=opt("max_frame_pixels"))
    # follow symbolic links that resolve outside the input folders (off: they are listed as
    # skipped; links inside the inputs are always followed, each folder walked once)
    follow_links: bool = field(default=False, metadata=opt("follow_links"))

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
        if self.decoder not in ("auto", "pyav", "decord"):
            raise ConfigError(f"--decoder: expected auto|pyav|decord, got {self.decoder!r}")
        if self.max_frame_pixels < 64 * 64:
            raise ConfigError(f"--max-frame-pixels must be >= 4096, got {self.max_frame_pixels}")


@dataclass(frozen=True)
class DetectConfig:
    """Face detection.

    ``det_thresh``: raising it drops doubtful faces (fewer false positives, more misses).
    ``min_face``: faces whose box is smaller (shorter side, pixels) are dropped.
    ``det_size``: the detector's input canvas (width, height); larger finds smaller faces
    but costs time roughly in proportion to its area. ``"auto"``: long side 640, short side
    fitted to each frame's aspect ratio (``fit_det_size``; the same faces as 640x640, less
    padding to compute).
    """

    pack: str | None = field(default=None, metadata=opt("det_pack"))  # None: the default pack; else a pack directory
    det_size: tuple[int, int] | str = field(default="auto", metadata=opt("det_size"))
    det_thresh: float = field(default=0.5, metadata=opt("det_thresh"))
    min_face: float = field(default=16.0, metadata=opt("min_face"))
    nms_thresh: float = 0.4
    max_faces: int = field(default=0, metadata=opt("max_faces"))  # 0 = no limit

    def __post_init__(self) -> None:
        object.__setattr__(self, "det_size", parse_det_size(self.det_size))
        if not 0.0 < self.det_thresh < 1.0:
            raise ConfigError(f"--det-thresh must be in (0, 1), got {self.det_thresh}")
        if self.min_face < 0:
            raise ConfigError(f"--min-face must be >= 0, got {self.min_face}")
        if not 0.0 < self.nms_thresh <= 1.0:
            raise ConfigError(f"detect nms_thresh must be in (0, 1], got {self.nms_thresh}")

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The detector canvas (width, height) for a frame of this size."""
        if self.det_size == "auto":
            return fit_det_size(height, width)
        return tuple(self.det_size)
        if self.max_faces < 0:
            raise ConfigError(f"--max-faces must be >= 0 (0: no limit), got {self.max_faces}")


@dataclass(frozen=True)
class TrackConfig:
    """Tracking (see :class:`fer_batch.track.FaceTracker`); every tuning value of the tracker.

    ``lost_s``: how long a track may go unseen and still take its face back by motion; longer
    bridges longer occlusions but lets another face that appears nearby inherit the id.
    ``match_thresh``: highest association cost (0..1) that continues a track; higher joins
    more (risk of id swaps), lower splits more. ``reid_thresh``: cosine similarity an
    embedding needs to re-identify an ended track; higher merges fewer different people but
    gives returning faces new ids more often (None: the value measured for the embedding model,
    from its card). ``reid_samples`` / ``reid_gap_s``: a track is embedded at most this many
    times, this many seconds apart, besides the faces no track takes by motion and the faces
    two tracks compete for; more samples make the track's appearance steadier and cost time.
    ``reid_margin``: faces "compete" when a second track's (or a second face's) motion cost is
    within this of the best pair's; higher embeds more faces, lower trusts motion more.

    Motion model, in units of the face size (sqrt of box area) so one setting fits small and
    large faces: ``accel_std`` (face sizes / s^2): higher lets faces change speed or direction
    faster between samples but widens the gate (more chance to grab a neighbour's face);
    ``meas_std``: jitter of the detected centre; ``init_vel_std``: speed a new face may already
    have; ``max_speed``: velocity estimates are clipped to this. ``gate_sigma``: a centre may
    be at most this many standard deviations of its prediction away (3 keeps ~99% of true
    matches; higher bridges longer or more erratic gaps, lower splits sooner), capped at
    ``gate_max_sizes`` face sizes so a long-lost track cannot grab a face anywhere.
    ``max_size_ratio``: a detection this many times larger or smaller is no match.
    Cost weights ``w_motion + w_iou + w_size == 1`` (motion, overlap, size); ``w_emb``: share
    of the cost taken by the embedding distance when embeddings are given; ``w_score``: doubtful
    detections need a closer match (higher protects tracks from background false positives but
    makes partly hidden faces re-join less often). ``last_seen_penalty`` (face sizes): extra
    distance charged to "stayed where last seen" for a missed face (lower favours
    stop-and-turn, higher constant motion). ``size_ema``: weight of a new observation in the
    smoothed face size. ``max_gallery``: ended tracks kept for re-identification.
    """

    lost_s: float = field(default=3.0, metadata=opt("lost_s"))
    match_thresh: float = 0.8
    reid: str = field(default="auto", metadata=opt("reid"))  # auto: the detector pack's recognition model, else the default face_embedding card; off; on
    reid_thresh: float | None = None  # None: the embedding model's measured value (its card); 0.5 for InsightFace packs
    reid_samples: int = 3
    reid_gap_s: float = 1.0
    reid_margin: float = 0.2
    accel_std: float = 3.0
    meas_std: float = 0.15
    init_vel_std: float = 2.0
    max_speed: float = 6.0
    gate_sigma: float = 3.0
    gate_max_sizes: float = 4.0
    max_size_ratio: float = 2.0
    w_motion: float = 0.5
    w_iou: float = 0.3
    w_size: float = 0.2
    w_emb: float = 0.5
    w_score: float = 0.4
    last_seen_penalty: float = 1.0
    size_ema: float = 0.5
    max_gallery: int = 2000

    def __post_init__(self) -> None:
        if self.reid not in REID_MODES:
            raise ConfigError(f"--reid: expected auto|on|off, got {self.reid!r}")
        if not (self.lost_s > 0 and math.isfinite(self.lost_s)):
            raise ConfigError(f"--lost-s must be a positive number of seconds, got {self.lost_s}")
        if not 0.0 < self.match_thresh <= 1.0:
            raise ConfigError(f"track match_thresh must be in (0, 1], got {self.match_thresh}")
        if self.reid_thresh is not None and not -1.0 <= self.reid_thresh <= 1.0:
            raise ConfigError(f"--reid-thresh must be a cosine similarity in [-1, 1], got {self.reid_thresh}")
        for name in ("accel_std", "meas_std", "init_vel_std", "max_speed", "gate_sigma", "gate_max_sizes"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"track {name} must be a positive number, got {v}")
        if not self.max_size_ratio > 1.0:
            raise ConfigError(f"track max_size_ratio must be > 1, got {self.max_size_ratio}")
        weights = (self.w_motion, self.w_iou, self.w_size)
        if min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6:
            raise ConfigError(f"track w_motion + w_iou + w_size must be 1 with none negative, got {weights}")
        for name in ("w_emb", "size_ema"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"track {name} must be in [0, 1], got {v}")
        if self.size_ema == 0:
            raise ConfigError("track size_ema must be > 0 (0 would never update the face size)")
        if self.w_score < 0 or self.last_seen_penalty < 0 or self.max_gallery < 0:
            raise ConfigError("track w_score, last_seen_penalty and max_gallery must be >= 0")


@dataclass(frozen=True)
class ClassifyConfig:
    """Emotion classification. ``smooth_s``: centred moving-average window per track (0 = off);
    longer gives steadier curves but blurs short expressions."""

    model: str | None = field(default=None, metadata=opt("model"))  # None: the registry's default; a name or a path
    batch_size: int = field(default=64, metadata=opt("batch_size"))
    device: str = field(default="auto", metadata=opt("device"))  # auto | cpu | cuda | cuda:N
    tta: bool | None = field(default=None, metadata=opt("tta"))  # None: follow the model card
    smooth_s: float = field(default=0.0, metadata=opt("smooth"))

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device: expected auto|cpu|cuda[:N], got {self.device!r}")
        if self.smooth_s < 0:
            raise ConfigError(f"--smooth must be >= 0, got {self.smooth_s}")


@dataclass(frozen=True)
class PlanConfig:
    """How sources become units of work (see :mod:`fer_batch.plan`).

    ``segment_s``: split videos (and image sequences) longer than this into time segments whose
    track ids are stitched afterwards; ``None``: ``DEFAULT_RAY_SEGMENT_S`` with the Ray runner,
    no splitting with the local one. Shorter segments spread one long video over more workers
    but re-analyse ``overlap_frames`` sampled frames (and at least ``lost_s``) per border.
    ``stitch_min_iou``: mean box IoU on the overlap frames a segment's track needs to continue
    an earlier id (real continuations score ~1; lower joins looser matches, higher splits more).
    ``min_last_segment``: a last piece shorter than this share of ``segment_s`` is folded into
    the previous segment.
    """

    segment_s: float | None = field(default=None, metadata=opt("segment_seconds"))
    overlap_frames: int = 4
    stitch_min_iou: float = 0.5
    min_last_segment: float = 0.25

    def __post_init__(self) -> None:
        if self.segment_s is not None and not (self.segment_s > 0 and math.isfinite(self.segment_s)):
            raise ConfigError(f"--segment-seconds must be > 0, got {self.segment_s}")
        if self.overlap_frames < 1:
            raise ConfigError(f"plan overlap_frames must be >= 1, got {self.overlap_frames}")
        if not 0.0 < self.stitch_min_iou <= 1.0:
            raise ConfigError(f"plan stitch_min_iou must be in (0, 1], got {self.stitch_min_iou}")
        if not 0.0 <= self.min_last_segment < 1.0:
            raise ConfigError(f"plan min_last_segment must be in [0, 1), got {self.min_last_segment}")


# Segment length of the Ray runner when --segment-seconds is not given.
DEFAULT_RAY_SEGMENT_S = 300.0


@dataclass(frozen=True)
class RayConfig:
    """The Ray runner's cluster side (ignored by the local runner)."""

    address: str | None = field(default=None, metadata=opt("ray_address"))  # None: embedded local instance
    num_workers: int | None = field(default=None, metadata=opt("num_workers"))
    cpus_per_worker: float = field(default=1.0, metadata=opt("cpus_per_worker"))
    gpus_per_worker: float = field(default=0.0, metadata=opt("gpus_per_worker"))
    dashboard: bool = field(default=False, metadata=opt("ray_dashboard"))

    def __post_init__(self) -> None:
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError(f"--num-workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ConfigError("--cpus-per-worker and --gpus-per-worker must be >= 0")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ConfigError(f"--gpus-per-worker above 1 must be a whole number, got {self.gpus_per_worker}")


@dataclass(frozen=True)
class RunConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    runner: str = field(default="local", metadata=opt("runner"))  # local | ray
    # CPU threads per worker: model sessions' intra-op pools, the video decoder and OpenCV
    # (0 = each library's default, about one per core)
    threads: int = field(default=0, metadata=opt("threads"))
    prefetch: int = 3  # frames decoded ahead in a background thread (0 or 1: one ahead)
    models_dir: str | None = field(default=None, metadata=opt("models_dir"))
    # Wall-clock limit per unit of work (a source, or one segment of a split source): "auto"
    # (see ``source_time_limit``), "off", or seconds. Anything but "off" runs the local
    # runner's work in a worker process that is killed when the limit passes.
    source_timeout: str = field(default="auto", metadata=opt("source_timeout"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_timeout", _parse_source_timeout(self.source_timeout))
        if self.runner not in RUNNERS:
            raise ConfigError(f"--runner: expected {'|'.join(RUNNERS)}, got {self.runner!r}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {self.threads}")
        if self.runner == "ray" and self.classify.device.startswith("cuda") and self.ray.gpus_per_worker == 0:
            raise ConfigError(f"--device {self.classify.device} with --runner ray needs --gpus-per-worker > 0")

    @property
    def isolated(self) -> bool:
        """Whether units run in a separate process that a time limit can stop."""
        return self.source_timeout != "off"

    def source_time_limit(self, media_s: float | None = None, sampled_frames: int | None = None) -> float | None:
        """Seconds one unit may take (``None``: no limit).

        A number given by the user applies as it is. ``auto`` is generous and grows with the
        work: ``AUTO_TIMEOUT_BASE_S`` (opening the media, loading nothing: models are loaded
        before the clock starts) plus ``AUTO_TIMEOUT_PER_MEDIA_S`` per second of media read and
        ``AUTO_TIMEOUT_PER_FRAME_S`` per sampled frame; until the media is opened (its length
        unknown) only the base applies.
        """
        if self.source_timeout == "off":
            return None
        if self.source_timeout != "auto":
            return float(self.source_timeout)
        return (
            AUTO_TIMEOUT_BASE_S
            + AUTO_TIMEOUT_PER_MEDIA_S * max(0.0, float(media_s or 0.0))
            + AUTO_TIMEOUT_PER_FRAME_S * max(0, int(sampled_frames or 0))
        )

    @property
    def segment_s(self) -> float | None:
        """The segment length in effect (``None``: sources are not split)."""
        if self.plan.segment_s is not None:
            return self.plan.segment_s
        return DEFAULT_RAY_SEGMENT_S if self.runner == "ray" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **section_changes: dict[str, Any]) -> "RunConfig":
        """``cfg.replace(detect={"det_size": 1024})``: a copy with fields of sections changed."""
        kw = {}
        for section, changes in section_changes.items():
            cur = getattr(self, section)
            kw[section] = dataclasses.replace(cur, **changes) if dataclasses.is_dataclass(cur) else changes
        return dataclasses.replace(self, **kw)


_SECTIONS = ("sampling", "detect", "track", "classify", "ray", "plan")


def _options() -> dict[str, tuple[str | None, str]]:
    out: dict[str, tuple[str | None, str]] = {}
    for section in _SECTIONS:
        cls = {f.name: f for f in dataclasses.fields(RunConfig)}[section].default_factory
        for f in dataclasses.fields(cls):
            if _OPTION in f.metadata:
                out[f.metadata[_OPTION]] = (section, f.name)
    for f in dataclasses.fields(RunConfig):
        if _OPTION in f.metadata:
            out[f.metadata[_OPTION]] = (None, f.name)
    return out


# User option name -> (config section or None for top level, field). Derived from the fields'
# metadata: the one place an option is declared is its config field.
OPTIONS: dict[str, tuple[str | None, str]] = _options()


def config_from_options(**options: Any) -> RunConfig:
    """A RunConfig from flat keyword options (``fps=2``, ``det_size=1024``); ``None`` keeps a default.

    ``every`` given without ``fps`` switches sampling from fps to every-N-frames.

    Raises:
        ConfigError: an unknown option (the message lists the valid ones) or an invalid value.
    """
    sections: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    top: dict[str, Any] = {}
    for k, v in options.items():
        if k not in OPTIONS:
            raise ConfigError(f"unknown option {k!r}; valid options: {', '.join(sorted(OPTIONS))}")
        if v is None:
            continue
        section, name = OPTIONS[k]
        (top if section is None else sections[section])[name] = v
    if "every" in sections["sampling"] and "fps" not in sections["sampling"]:
        sections["sampling"]["fps"] = None
    return RunConfig(
        sampling=SamplingConfig(**sections["sampling"]),
        detect=DetectConfig(**sections["detect"]),
        track=TrackConfig(**sections["track"]),
        classify=ClassifyConfig(**sections["classify"]),
        ray=RayConfig(**sections["ray"]),
        plan=PlanConfig(**sections["plan"]),
        **top,
    )
