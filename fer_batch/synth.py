"""Real sample media, generated offline from the group photo shipped in insightface.

``insightface/data/images/t1.jpg`` (1280x886, 6 people) is the only face photo every install
has. From it we make:

* ``make_sample_video``: the 6 faces cut from t1, moving smoothly along known paths over a
  plain background, written with OpenCV (MPEG-4 part 2, which decord reads), with the
  ground-truth box of every face in every frame;
* ``make_image_folder``: t1 and crops / flips of it in several formats (JPEG, PNG, BMP, WebP,
  TIFF, GIF), including gray, alpha, 16-bit, CMYK and an EXIF-rotated JPEG, each with its
  expected faces;
* bad files for error handling (empty, random bytes, truncated or corrupted videos, fake and
  bomb-sized images), rotation metadata and variable-frame-rate timing written straight into
  the MP4 boxes (no ffmpeg binary needed).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fer_batch.errors import FerBatchError
from fer_batch.mp4box import (  # noqa: F401 - set_rotation, sample_byte_ranges: re-exported for tests
    faststart_bytes,
    sample_byte_ranges,
    set_frame_durations,
    set_rotation,
    top_level_boxes,
)

# Faces of t1.jpg, sorted left to right: xyxy boxes and 5 landmarks (left eye, right eye,
# nose, left / right mouth corner). Measured once with the default detector
# (models/retinaface_mnet025, det_size 1280x896, all scores > 0.99); rounded to 0.1 px.
T1_FACE_BOXES = np.array(
    [
        [61.1, 264.9, 166.6, 392.4],
        [271.1, 147.2, 365.7, 267.2],
        [463.0, 264.4, 572.9, 415.1],
        [742.4, 348.0, 841.4, 476.0],
        [903.4, 54.6, 1008.2, 199.4],
        [1132.1, 274.9, 1223.1, 397.0],
    ],
    dtype=np.float32,
)
T1_FACE_KPS = np.array(
    [
        [[86.7, 327.6], [127.1, 304.6], [119.3, 334.2], [115.8, 369.0], [148.2, 349.4]],
        [[287.3, 207.7], [320.2, 195.8], [305.1, 230.3], [312.5, 244.5], [338.8, 234.0]],
        [[489.7, 318.5], [540.4, 331.3], [506.5, 364.1], [482.3, 367.0], [532.5, 377.3]],
        [[760.7, 400.0], [801.1, 400.5], [773.3, 430.0], [763.1, 436.5], [804.9, 436.3]],
        [[916.0, 116.7], [945.9, 113.9], [919.1, 149.3], [936.2, 167.3], [956.7, 164.0]],
        [[1150.7, 325.4], [1190.8, 324.3], [1167.5, 348.6], [1153.2, 363.5], [1192.3, 362.4]],
    ],
    dtype=np.float32,
)


def t1_path() -> Path:
    """Path of insightface's t1.jpg in the installed package."""
    import insightface

    p = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    if not p.is_file():
        raise FerBatchError(f"insightface's sample photo is missing: {p} (reinstall insightface)")
    return p


def load_t1() -> np.ndarray:
    """t1.jpg as a BGR uint8 array (886, 1280, 3)."""
    img = cv2.imread(str(t1_path()), cv2.IMREAD_COLOR)
    if img is None:
        raise FerBatchError(f"cannot decode {t1_path()}")
    return img


# ---------------------------------------------------------------------------- video
@dataclass
class SyntheticVideo:
    """A generated video and its ground truth.

    Attributes:
        boxes: (frames, faces, 4) xyxy pixels of each face in each frame.
        kps: (frames, faces, 5, 2) landmarks.
        timestamps: (frames,) presentation time of each frame in seconds.
    """

    path: Path
    fps: float
    size: tuple[int, int]  # (width, height)
    frame_count: int
    boxes: np.ndarray
    kps: np.ndarray
    timestamps: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        if self.timestamps is None:
            self.timestamps = np.arange(self.frame_count, dtype=np.float64) / self.fps


def background(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth, face-free BGR background: a colour gradient with soft low-frequency blobs."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0 = rng.uniform(40, 110, 3)
    c1 = rng.uniform(120, 200, 3)
    t = (xx / max(w - 1, 1) * 0.6 + yy / max(h - 1, 1) * 0.4)[..., None]
    img = c0 * (1 - t) + c1 * t
    noise = rng.normal(0, 1, (max(h // 90, 2), max(w // 90, 2), 3)).astype(np.float32)
    noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC) * 12.0
    return np.clip(img + noise, 0, 255).astype(np.uint8)


@dataclass
class _Patch:
    image: np.ndarray  # BGR, scaled
    alpha: np.ndarray  # float32 (h, w, 1) in [0, 1]
    box: np.ndarray  # face box inside the patch (xyxy)
    kps: np.ndarray  # (5, 2) inside the patch


def face_patches(scale: float, margin: float = 0.45) -> list[_Patch]:
    """The 6 faces of t1 as feathered patches (face box + ``margin`` of its size on each side)."""
    t1 = load_t1()
    H, W = t1.shape[:2]
    out = []
    for box, kps in zip(T1_FACE_BOXES, T1_FACE_KPS):
        x1, y1, x2, y2 = box
        m = margin * max(x2 - x1, y2 - y1)
        px1, py1 = int(max(0, math.floor(x1 - m))), int(max(0, math.floor(y1 - m)))
        px2, py2 = int(min(W, math.ceil(x2 + m))), int(min(H, math.ceil(y2 + m)))
        crop = t1[py1:py2, px1:px2]
        pw, ph = max(1, int(round(crop.shape[1] * scale))), max(1, int(round(crop.shape[0] * scale)))
        sx, sy = pw / crop.shape[1], ph / crop.shape[0]
        img = cv2.resize(crop, (pw, ph), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        mask = np.zeros((ph, pw), np.float32)
        cv2.ellipse(mask, (pw // 2, ph // 2), (int(pw * 0.48), int(ph * 0.48)), 0, 0, 360, 1.0, -1)
        k = max(3, int(min(pw, ph) * 0.08) | 1)
        mask = cv2.GaussianBlur(mask, (k, k), 0)[..., None]
        fb = np.array([(x1 - px1) * sx, (y1 - py1) * sy, (x2 - px1) * sx, (y2 - py1) * sy], np.float32)
        fk = np.stack([(kps[:, 0] - px1) * sx, (kps[:, 1] - py1) * sy], axis=1).astype(np.float32)
        out.append(_Patch(img, mask, fb, fk))
    return out


def compose(bg: np.ndarray, patches: list[_Patch], positions: np.ndarray) -> np.ndarray:
    """Paste patches (top-left corners ``positions``, integer pixels) onto a copy of ``bg``."""
    frame = bg.copy()
    H, W = frame.shape[:2]
    for p, (x, y) in zip(patches, positions.astype(int)):
        ph, pw = p.image.shape[:2]
        x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + pw, W), min(y + ph, H)
        if x2 <= x1 or y2 <= y1:
            continue
        sub = p.image[y1 - y : y2 - y, x1 - x : x2 - x].astype(np.float32)
        a = p.alpha[y1 - y : y2 - y, x1 - x : x2 - x]
        dst = frame[y1:y2, x1:x2].astype(np.float32)
        frame[y1:y2, x1:x2] = np.clip(sub * a + dst * (1 - a), 0, 255).astype(np.uint8)
    return frame


def _writer(path: Path, fps: float, size: tuple[int, int], fourcc: str) -> cv2.VideoWriter:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), tuple(int(v) for v in size))
    if not w.isOpened():
        raise FerBatchError(f"OpenCV cannot write {path} with codec {fourcc!r}")
    return w


def make_sample_video(
    path: str | Path,
    seconds: float = 6,
    fps: float = 25,
    size: tuple[int, int] = (960, 540),
    moving: bool = True,
    seed: int = 0,
    fourcc: str = "mp4v",
    n_frames: int | None = None,
) -> SyntheticVideo:
    """Write a video of the 6 faces of t1 moving smoothly over a background.

    Faces sit on a 3x2 grid; each circles its cell centre on an ellipse (period 3-6 s, phase
    from ``seed``) and never overlaps another or leaves the frame. Face heights are about a
    fifth of the frame height (about 70 px at 640x360).

    ``n_frames`` overrides ``seconds * fps``.

    Returns:
        ``SyntheticVideo`` with per-frame ground-truth boxes and landmarks.
    """
    path = Path(path)
    w, h = int(size[0]), int(size[1])
    n = int(n_frames) if n_frames is not None else max(1, int(round(seconds * fps)))
    rng = np.random.default_rng(seed)
    patches = face_patches(scale=h / 886 * 1.1)
    bg = background((w, h), seed)
    cell_w, cell_h = w / 3, h / 2
    centres = np.array([[(c + 0.5) * cell_w, (r + 0.5) * cell_h] for r in range(2) for c in range(3)])
    # t1's faces left to right -> grid in reading order
    phase = rng.uniform(0, 2 * np.pi, 6)
    period = rng.uniform(3.0, 6.0, 6)
    boxes = np.zeros((n, 6, 4), np.float32)
    kps = np.zeros((n, 6, 5, 2), np.float32)
    writer = _writer(path, fps, (w, h), fourcc)
    try:
        for i in range(n):
            t = i / fps
            pos = np.zeros((6, 2), np.int64)
            for f, p in enumerate(patches):
                ph, pw = p.image.shape[:2]
                ax = max(0.0, min(0.2 * cell_w, (cell_w - pw) / 2 - 2))
                ay = max(0.0, min(0.2 * cell_h, (cell_h - ph) / 2 - 2))
                ang = phase[f] + 2 * np.pi * t / period[f] if moving else phase[f]
                cx = centres[f, 0] + ax * np.cos(ang)
                cy = centres[f, 1] + ay * np.sin(ang)
                x = int(np.clip(round(cx - pw / 2), 0, w - pw))
                y = int(np.clip(round(cy - ph / 2), 0, h - ph))
                pos[f] = (x, y)
                boxes[i, f] = p.box + np.array([x, y, x, y], np.float32)
                kps[i, f] = p.kps + np.array([x, y], np.float32)
            writer.write(compose(bg, patches, pos))
    finally:
        writer.release()
    return SyntheticVideo(path=path, fps=float(fps), size=(w, h), frame_count=n, boxes=boxes, kps=kps)


def make_vfr_video(
    path: str | Path,
    frame_durations_s: list[float] | np.ndarray,
    size: tuple[int, int] = (320, 180),
    seed: int = 0,
) -> SyntheticVideo:
    """A variable-frame-rate MP4: frame ``i`` lasts ``frame_durations_s[i]`` seconds.

    The frames are those of ``make_sample_video`` (at the mean rate); the MP4 time-to-sample
    table is then rewritten with the given durations, so the timestamps are exact and the
    container's average frame rate is wrong for every part that is not at the mean rate.
    """
    durs = np.asarray(frame_durations_s, dtype=np.float64)
    n = len(durs)
    mean_fps = n / float(durs.sum())
    tmp = Path(path)
    vid = make_sample_video(tmp, fps=round(mean_fps, 3), size=size, seed=seed, n_frames=n)
    ticks = set_frame_durations(tmp, durs)
    vid.timestamps = ticks
    return vid


# ---------------------------------------------------------------------------- images
@dataclass
class SyntheticImage:
    """A generated image and the faces it shows (boxes in display orientation)."""

    path: Path
    faces: int
    boxes: np.ndarray  # (faces, 4) xyxy
    note: str = ""


def make_image_folder(directory: str | Path, n: int | None = None, scale: float = 1.0) -> list[SyntheticImage]:
    """Write real face photos in many formats; returns what each image shows.

    Variants, in order: t1 (JPEG), mirrored (PNG), left crop (BMP, 3 faces), right crop (WebP,
    3 faces), gray (JPEG), alpha (PNG RGBA, transparent top band), EXIF orientation 6 (JPEG
    stored sideways), 16-bit gray (PNG), CMYK (JPEG), palette (GIF), TIFF. ``n`` keeps the
    first n; ``scale`` resizes the photo first (0.5 makes faces of about 55-75 px).
    """
    from PIL import Image

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    t1 = load_t1()
    if scale != 1.0:
        t1 = cv2.resize(t1, (round(t1.shape[1] * scale), round(t1.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    boxes = T1_FACE_BOXES * scale
    H, W = t1.shape[:2]
    rgb = cv2.cvtColor(t1, cv2.COLOR_BGR2RGB)
    out: list[SyntheticImage] = []

    def inside(b: np.ndarray, x0: float, x1: float) -> np.ndarray:
        keep = (b[:, 0] >= x0) & (b[:, 2] <= x1)
        return b[keep] - np.array([x0, 0, x0, 0], np.float32)

    def add(name: str, write, bxs: np.ndarray, note: str) -> None:
        p = d / name
        write(p)
        out.append(SyntheticImage(p, len(bxs), bxs.astype(np.float32), note))

    add("01_t1.jpg", lambda p: cv2.imwrite(str(p), t1, [cv2.IMWRITE_JPEG_QUALITY, 92]), boxes, "original")
    flipped = boxes.copy()
    flipped[:, [0, 2]] = W - boxes[:, [2, 0]]
    add("02_t1_mirror.png", lambda p: cv2.imwrite(str(p), t1[:, ::-1]), flipped, "mirrored PNG")
    xl = int(600 * scale)
    add("03_left.bmp", lambda p: cv2.imwrite(str(p), t1[:, :xl]), inside(boxes, 0, xl), "left crop, BMP")
    xr = int(700 * scale)
    add(
        "04_right.webp",
        lambda p: Image.fromarray(rgb[:, xr:]).save(p, quality=90),
        inside(boxes, xr, W),
        "right crop, WebP",
    )
    add("05_gray.jpg", lambda p: Image.fromarray(rgb).convert("L").save(p, quality=92), boxes, "8-bit gray JPEG")

    def write_alpha(p: Path) -> None:
        a = np.full((H, W), 255, np.uint8)
        a[: int(30 * scale)] = 0  # a transparent band above the faces
        Image.fromarray(np.dstack([rgb, a]), "RGBA").save(p)

    add("06_alpha.png", write_alpha, boxes, "RGBA PNG, transparent top band")

    def write_exif(p: Path) -> None:
        stored = cv2.rotate(rgb, cv2.ROTATE_90_COUNTERCLOCKWISE)  # orientation 6 turns it back
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(stored).save(p, quality=92, exif=exif)

    add("07_exif_rot6.jpg", write_exif, boxes, "stored sideways, EXIF orientation 6")

    def write_16(p: Path) -> None:
        g = cv2.cvtColor(t1, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
        cv2.imwrite(str(p), g)

    add("08_gray16.png", write_16, boxes, "16-bit gray PNG")
    add("09_cmyk.jpg", lambda p: Image.fromarray(rgb).convert("CMYK").save(p, quality=92), boxes, "CMYK JPEG")
    add(
        "10_palette.gif",
        lambda p: Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(p),
        boxes,
        "palette GIF",
    )
    add("11_t1.tiff", lambda p: Image.fromarray(rgb).save(p, compression="tiff_lzw"), boxes, "TIFF (LZW)")
    if n is not None:
        for extra in out[n:]:
            extra.path.unlink(missing_ok=True)
        out = out[:n]
    return out


# ---------------------------------------------------------------------------- bad files
def write_empty(path: str | Path) -> Path:
    """A zero-byte file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def write_random_bytes(path: str | Path, n: int = 65536, seed: int = 0) -> Path:
    """``n`` random bytes (give it a video or image extension to fake a media file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return p


def write_not_an_image(path: str | Path) -> Path:
    """A text file under an image name."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("This is a text file with an image extension, not an image.\n" * 20)
    return p


def write_text_file(path: str | Path, text: str = "notes: not a media file\n") -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def write_bomb_png(path: str | Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(typ: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + typ + data + struct.pack(">I", zlib.crc32(typ + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 1024)  # far too little data: never meant to be decoded
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return p


def make_truncated_video(src: str | Path, dst: str | Path, keep: float = 0.4, faststart: bool = False) -> Path:
    """Copy the first ``keep`` fraction of a video (a download or recording cut short).

    With ``faststart`` the MP4 index is moved to the front first, so the truncated file still
    has its index but lacks most of its frame data.
    """
    src, dst = Path(src), Path(dst)
    data = faststart_bytes(src.read_bytes()) if faststart else src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def make_corrupt_video(
    src: str | Path, dst: str | Path, start: float = 0.4, length: float = 0.25, seed: int = 0
) -> tuple[Path, tuple[int, int]]:
    """Copy a video and overwrite bytes ``[start, start + length)`` (fractions) with noise.

    The MP4 index (at the end for OpenCV's writer) stays intact, so the file opens and the
    frames before the damage decode. Returns the path and the damaged byte range.
    """
    src, dst = Path(src), Path(dst)
    data = bytearray(src.read_bytes())
    a = int(len(data) * start)
    b = min(len(data), a + int(len(data) * length))
    moov = top_level_boxes(bytes(data)).get("moov")
    if moov is not None and a < moov[1] and b > moov[0]:
        raise FerBatchError(f"make_corrupt_video: range {a}-{b} would hit the index box of {src}")
    data[a:b] = np.random.default_rng(seed).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))
    return dst, (a, b)


# ---------------------------------------------------------------------------- sample set
def write_sample_set(directory: str | Path, seconds: float = 6, size: tuple[int, int] = (960, 540)) -> dict:
    """The README's sample: ``sample_video.mp4`` and ``images/`` (a few photos) in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vid = make_sample_video(d / "sample_video.mp4", seconds=seconds, size=size)
    imgs = make_image_folder(d / "images", n=4)
    return {"video": vid, "images": imgs}
