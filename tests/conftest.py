"""Shared fixtures: small real media generated once per test session (no /work/shared).

Everything is made from insightface's group photo t1.jpg by ``fer_batch.synth``:
``sample_video`` (4 s, 640x360, 25 fps, 6 moving faces, ground-truth boxes), ``image_folder``
(11 photos in many formats), ``bad_files`` (one of each broken input) and ``mixed_folder``
(good and bad inputs together, as a user's folder would be).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from fer_batch import synth


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """Session-wide folder for generated media."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def sample_video(media_dir) -> synth.SyntheticVideo:
    """4 s, 640x360, 25 fps MPEG-4 video of the 6 faces of t1 moving; ``.boxes`` is the truth."""
    return synth.make_sample_video(media_dir / "video" / "faces_640x360.mp4", seconds=4, fps=25, size=(640, 360))


@pytest.fixture(scope="session")
def image_folder(media_dir) -> list[synth.SyntheticImage]:
    """11 real face photos (t1 at half size, crops, flips) in JPEG/PNG/BMP/WebP/GIF/TIFF, incl.
    gray, RGBA, 16-bit, CMYK and EXIF-rotated. ``.faces`` is the number of faces shown."""
    return synth.make_image_folder(media_dir / "images", scale=0.5)


@pytest.fixture(scope="session")
def bad_files(media_dir, sample_video) -> dict[str, Path]:
    """One file per broken-input case (paths; ``missing`` does not exist).

    ``corrupt`` has its middle overwritten with noise (its index intact); ``corrupt_range`` is
    the damaged byte range. ``unreadable`` is chmod 000 (still readable when tests run as root:
    check ``unreadable_blocks``).
    """
    d = media_dir / "bad"
    d.mkdir(parents=True, exist_ok=True)
    src = sample_video.path
    corrupt, rng = synth.make_corrupt_video(src, d / "corrupt_middle.mp4", start=0.45, length=0.25)
    out: dict = {
        "missing": d / "does_not_exist.mp4",
        "empty": synth.write_empty(d / "empty.mp4"),
        "random": synth.write_random_bytes(d / "random_bytes.mp4", 50_000),
        "truncated": synth.make_truncated_video(src, d / "truncated.mp4", keep=0.4),
        "truncated_faststart": synth.make_truncated_video(src, d / "truncated_faststart.mp4", keep=0.4, faststart=True),
        "corrupt": corrupt,
        "corrupt_range": rng,
        "not_image": synth.write_not_an_image(d / "not_an_image.jpg"),
        "bomb": synth.write_bomb_png(d / "bomb.png", 100_000, 100_000),
        "bomb_mid": synth.write_bomb_png(d / "bomb_120mp.png", 12_000, 10_000),
        "text": synth.write_text_file(d / "notes.txt"),
    }
    unreadable = shutil.copy(src, d / "unreadable.mp4")
    os.chmod(unreadable, 0)
    out["unreadable"] = Path(unreadable)
    try:
        with open(unreadable, "rb") as fh:
            fh.read(1)
        out["unreadable_blocks"] = False  # root: permission bits do not stop reads
    except PermissionError:
        out["unreadable_blocks"] = True
    return out


@pytest.fixture(scope="session")
def mixed_folder(media_dir, sample_video, image_folder, bad_files) -> Path:
    """A folder as users have them: a good video, 2 good photos in a subfolder, a text file,
    and the bad files (empty, random, truncated, corrupt, not-an-image, bomb)."""
    d = media_dir / "mixed"
    (d / "photos").mkdir(parents=True, exist_ok=True)
    shutil.copy(sample_video.path, d / "good.mp4")
    for img in image_folder[:2]:
        shutil.copy(img.path, d / "photos" / img.path.name)
    for key in ("empty", "random", "truncated", "corrupt", "not_image", "bomb", "text"):
        shutil.copy(bad_files[key], d / Path(bad_files[key]).name)
    return d


@pytest.fixture(scope="session")
def face_crops() -> tuple[np.ndarray, np.ndarray]:
    """The 6 faces of insightface's t1.jpg, aligned to the FER2013 framing (48x48 gray), left to right,
    and whether each one smiles broadly (the 2nd and 4th from the left)."""
    import insightface

    from fer_batch.config import DetectConfig
    from fer_batch.detect import FaceDetector
    from fer_batch.models import Registry
    from fer_batch.preprocess import PreprocessSpec, align_crop
    from fer_batch.types import Frame

    img = insightface.data.get_image("t1")
    det = FaceDetector(DetectConfig(), threads=1)
    det.setup()
    fd = det(Frame(0, 0.0, img))
    order = np.argsort(fd.xyxy[:, 0])
    spec = PreprocessSpec.from_card(Registry.from_dir(Path(__file__).resolve().parents[1] / "models").get("mini_xception_fer"))
    spec48 = PreprocessSpec(size=48, template=spec.template, template_size=spec.template_size)
    crops = align_crop(img, fd.kps[order], spec48)
    gray = np.stack([cv2.cvtColor(c, cv2.COLOR_BGR2GRAY) for c in crops])
    return gray, np.array([False, True, False, True, False, False])
