"""Inputs: discovery, sampling plans, video/image decoding, bad files (all on generated media)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from fer_batch import synth
from fer_batch.config import SamplingConfig
from fer_batch.errors import DecodeError
from fer_batch.io import MediaReader, discover, read_image, sample_indices, source_id_for
from fer_batch.io.discover import natural_key
from fer_batch.types import MediaSource


def video_source(path) -> MediaSource:
    p = Path(path)
    return MediaSource(path=p, kind="video", source_id=source_id_for(p))


def read_all(path, sampling=SamplingConfig(fps=None), decoder: str = "decord", **kw):
    with MediaReader(video_source(path), dataclasses.replace(sampling, decoder=decoder), **kw) as r:
        return list(r), r


@pytest.fixture(params=["decord", "pyav"])
def decoder(request) -> str:
    """Video tests that take this fixture run against both decoder backends."""
    return request.param


# ---------------------------------------------------------------------------- discover
def test_discover_walks_folders_in_natural_order(tmp_path, sample_video, image_folder):
    root = tmp_path / "in"
    (root / "b" / "deep").mkdir(parents=True)
    shutil.copy(sample_video.path, root / "clip10.mp4")
    shutil.copy(sample_video.path, root / "clip9.MP4")
    shutil.copy(image_folder[0].path, root / "b" / "img2.jpg")
    shutil.copy(image_folder[1].path, root / "b" / "img10.png")
    shutil.copy(image_folder[2].path, root / "b" / "deep" / "x.bmp")
    (root / "b" / "readme.txt").write_text("hello")
    (root / ".DS_Store").write_bytes(b"\0\0")
    (root / "._clip9.mp4").write_bytes(b"\0" * 10)  # macOS resource fork: hidden, ignored

    sources, rows = discover([root, root / "clip9.MP4", tmp_path / "nope.mov"], SamplingConfig())
    names = [s.path.name for s in sources]
    # a folder's files first, then its subfolders, each in natural order; clip9 listed again: once
    assert names == ["clip9.MP4", "clip10.mp4", "img2.jpg", "img10.png", "x.bmp"]
    assert [s.kind for s in sources] == ["video", "video", "image", "image", "image"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {"readme.txt", "nope.mov"}
    assert by_name["readme.txt"]["status"] == "skipped" and by_name["readme.txt"]["kind"] == "other"
    assert "not a media file" in by_name["readme.txt"]["error"]
    assert by_name["nope.mov"]["status"] == "failed" and "no such file" in by_name["nope.mov"]["error"]
    for r in rows:
        assert r["frames_sampled"] == 0 and r["faces"] == 0 and r["tracks"] == 0 and r["wall_s"] == 0.0
        assert len(r["source_id"]) == 12
    # ids are stable and distinct; paths are absolute
    again, _ = discover([root], SamplingConfig())
    assert [s.source_id for s in again] == [s.source_id for s in sources]
    assert len({s.source_id for s in sources}) == len(sources)
    assert all(s.path.is_absolute() for s in sources)


def test_discover_images_as_sequence(tmp_path, image_folder, sample_video):
    d = tmp_path / "seq"
    (d / "sub").mkdir(parents=True)
    for i, img in enumerate(image_folder[:3]):
        shutil.copy(img.path, d / f"frame{i * 5}{img.path.suffix}")  # frame0, frame5, frame10
    shutil.copy(image_folder[3].path, d / "sub" / "a.webp")
    shutil.copy(sample_video.path, d / "v.mp4")
    cfg = SamplingConfig(images_as="sequence", image_fps=4.0)
    sources, rows = discover([d, image_folder[4].path], cfg)
    assert rows == []
    kinds = [(s.kind, s.path.name) for s in sources]
    assert kinds == [("video", "v.mp4"), ("image_sequence", "seq"), ("image_sequence", "sub"), ("image", image_folder[4].path.name)]
    seq = sources[1]
    assert [f.name for f in seq.frames] == ["frame0.jpg", "frame5.png", "frame10.bmp"]
    assert seq.fps == 4.0


def _rows_by_name(rows) -> dict:
    return {Path(r["path"]).name: r for r in rows}


def test_discover_sibling_link_web_is_walked_once(tmp_path, image_folder):
    """3 folders with 2 links each to the others (and to the root): every folder once, each
    image once under its real path, in bounded work (no exponential growth)."""
    root = tmp_path / "web"
    names = ["a", "b", "c"]
    for n in names:
        (root / n).mkdir(parents=True)
        shutil.copy(image_folder[0].path, root / n / f"{n}.jpg")
    for n in names:
        for m in names:
            if m != n:
                os.symlink(root / m, root / n / f"to_{m}")
        os.symlink(root, root / n / "to_root")  # a loop through the root
    sources, rows = discover([root], SamplingConfig())
    assert sorted(s.path for s in sources) == [root / n / f"{n}.jpg" for n in names]
    loops = [r for r in rows if "loop" in (r["error"] or "")]
    assert len(loops) == 3 and all(r["status"] == "skipped" and Path(r["path"]).name == "to_root" for r in loops)
    assert all(r["status"] == "skipped" for r in rows), rows


def test_discover_links_outside_the_inputs_are_not_followed_by_default(tmp_path, image_folder):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(image_folder[0].path, outside / "secret.jpg")
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    shutil.copy(image_folder[1].path, root / "sub" / "inside.png")
    os.symlink(outside, root / "dirlink")
    os.symlink(outside / "secret.jpg", root / "filelink.jpg")
    os.symlink(root / "sub" / "inside.png", root / "internal.png")  # inside the inputs: kept (once)
    sources, rows = discover([root], SamplingConfig())
    assert [s.path.name for s in sources] == ["inside.png"]  # the link to it is the same file
    by = _rows_by_name(rows)
    assert set(by) == {"dirlink", "filelink.jpg"}
    for n, what in (("dirlink", "folder"), ("filelink.jpg", "file")):
        assert by[n]["status"] == "skipped", by[n]
        assert f"symbolic link to the {what} {outside}" in by[n]["error"] and "outside the input folders" in by[n]["error"]
        assert by[n]["error"].startswith(str(root / n))
    # the option follows them (each folder and file still once: filelink.jpg is secret.jpg)
    sources, rows = discover([root], SamplingConfig(follow_links=True))
    assert [s.path.relative_to(root).as_posix() for s in sources] == ["sub/inside.png", "dirlink/secret.jpg"]
    assert rows == []
    # a link given directly as an input is what the user asked for: followed
    sources, rows = discover([root / "filelink.jpg"], SamplingConfig())
    assert [s.path.name for s in sources] == ["filelink.jpg"] and rows == []


def test_discover_lists_fifos_sockets_and_dangling_links(tmp_path):
    import socket

    root = tmp_path / "in"
    root.mkdir()
    os.mkfifo(root / "pipe.mp4")
    os.symlink(root / "pipe.mp4", root / "link_to_pipe.jpg")
    os.symlink(root / "gone.mp4", root / "dangling.mp4")
    os.symlink(root / "self.mp4", root / "self.mp4")  # a link to itself (ELOOP)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock.mp4"))
        sources, rows = discover([root, root / "pipe.mp4"], SamplingConfig())  # never blocks on the FIFO
    finally:
        sock.close()
    assert sources == []
    by = _rows_by_name(rows)
    assert set(by) == {"pipe.mp4", "link_to_pipe.jpg", "dangling.mp4", "self.mp4", "sock.mp4"}
    assert by["pipe.mp4"]["status"] == "skipped" and "named pipe (FIFO)" in by["pipe.mp4"]["error"]
    assert by["link_to_pipe.jpg"]["status"] == "skipped" and "named pipe" in by["link_to_pipe.jpg"]["error"]
    assert by["sock.mp4"]["status"] == "skipped" and "socket" in by["sock.mp4"]["error"]
    assert by["dangling.mp4"]["status"] == "failed" and "broken symbolic link" in by["dangling.mp4"]["error"]
    assert by["self.mp4"]["status"] == "failed" and "symbolic link" in by["self.mp4"]["error"]
    for n, r in by.items():
        assert r["error"].startswith(str(root / n)), r  # the reason names the file


def test_discover_non_utf8_name_fails_with_a_printable_path(tmp_path, image_folder):
    root = tmp_path / "in"
    root.mkdir()
    bad = root / os.fsdecode(b"caf\xe9.jpg")  # Latin-1 name: not valid UTF-8
    shutil.copy(image_folder[0].path, bad)
    shutil.copy(image_folder[0].path, root / "good.jpg")
    sources, rows = discover([root], SamplingConfig())
    assert [s.path.name for s in sources] == ["good.jpg"]
    (r,) = rows
    assert r["status"] == "failed" and r["path"].endswith("caf\\xe9.jpg") and "not valid UTF-8" in r["error"]
    r["path"].encode("utf-8")
    r["error"].encode("utf-8")


def test_natural_key():
    names = ["f10.png", "f2.png", "F1.png", "f1b.png", "g.png"]
    assert sorted(names, key=natural_key) == ["F1.png", "f1b.png", "f2.png", "f10.png", "g.png"]


# ---------------------------------------------------------------------------- sampling plan
def test_sample_indices_fps_grid_cfr():
    ts = np.arange(250) / 25.0  # 10 s at 25 fps
    idx = sample_indices(ts, SamplingConfig(fps=2.0))
    # first frame at or after k/2 s: 0, 0.52 (13), 1.0 (25), ...
    assert idx[:5].tolist() == [0, 13, 25, 38, 50]
    assert len(idx) == 20
    assert sample_indices(ts, SamplingConfig(fps=100.0)).tolist() == list(range(250))  # above native: all
    assert sample_indices(ts, SamplingConfig(fps=None)).tolist() == list(range(250))


def test_sample_indices_float32_timestamps_on_grid():
    ts = (np.arange(300, dtype=np.float32) / np.float32(30.0)).astype(np.float64)  # decord gives float32
    idx = sample_indices(ts, SamplingConfig(fps=2.0))
    assert idx[:4].tolist() == [0, 15, 30, 45]


def test_sample_indices_every_start_end_max():
    ts = np.arange(100) / 10.0
    assert sample_indices(ts, SamplingConfig(every=7)).tolist() == list(range(0, 100, 7))
    idx = sample_indices(ts, SamplingConfig(every=3, start_s=2.05, end_s=4.0))
    assert idx.tolist() == [21, 24, 27, 30, 33, 36, 39]  # phase counted from the first frame >= start
    idx = sample_indices(ts, SamplingConfig(fps=1.0, start_s=2.5))
    assert idx.tolist() == [25, 35, 45, 55, 65, 75, 85, 95]  # grid anchored at start
    assert sample_indices(ts, SamplingConfig(fps=1.0, max_frames=3)).tolist() == [0, 10, 20]
    assert sample_indices(ts, SamplingConfig(fps=1.0, start_s=20.0)).tolist() == []


def test_sample_indices_vfr_takes_first_frame_at_or_after_each_grid_time():
    # 0..2 s at 30 fps, then 2..6 s at 5 fps, then a 1.3 s frame, then 10 fps
    ts = np.concatenate([np.arange(60) / 30, 2 + np.arange(20) / 5, [6.0], 7.3 + np.arange(10) / 10])
    idx = sample_indices(ts, SamplingConfig(fps=2.0))
    got = ts[idx]
    grid = np.arange(0, 8.5, 0.5)
    expect = []
    for g in grid:
        j = np.searchsorted(ts, g - 1e-9)
        if j < len(ts) and (not expect or j > expect[-1]):
            expect.append(int(j))
    assert idx.tolist() == expect
    assert np.all(np.diff(got) > 0)
    # the 1.3 s frame at 6.0 serves grid 6.0 only; 6.5 and 7.0 are served by the next frame (7.3)
    assert 6.0 in got.tolist() and 7.3 in np.round(got, 6).tolist()


def test_segments_concatenate_to_the_whole_plan():
    rng = np.random.default_rng(3)
    ts = np.cumsum(rng.uniform(0.01, 0.2, 2000))
    ts -= ts[0]
    for cfg in (SamplingConfig(fps=2.0), SamplingConfig(every=5), SamplingConfig(fps=3.0, start_s=7.0, max_frames=40)):
        whole = sample_indices(ts, cfg)
        cuts = np.sort(rng.uniform(0, ts[-1], 6))
        cuts = np.concatenate([[0.0], cuts, [ts[-1] + 1]])
        parts = [sample_indices(ts, cfg, (a, b)) for a, b in zip(cuts[:-1], cuts[1:])]
        assert np.concatenate(parts).tolist() == whole.tolist()
    # a cut exactly on a (float32-rounded) frame time puts the frame in exactly one segment
    ts32 = (np.arange(100, dtype=np.float32) / np.float32(30)).astype(np.float64)
    a = sample_indices(ts32, SamplingConfig(fps=None), (0.0, 1.0))
    b = sample_indices(ts32, SamplingConfig(fps=None), (1.0, 5.0))
    assert a[-1] == 29 and b[0] == 30


# ---------------------------------------------------------------------------- video reading
def test_video_reader_samples_real_frames_at_2fps(sample_video, decoder):
    frames, r = read_all(sample_video.path, SamplingConfig(), decoder=decoder)
    assert (r.width, r.height) == (640, 360)
    assert r.frame_count == sample_video.frame_count == 100
    assert r.native_fps == pytest.approx(25.0)
    assert r.duration_s == pytest.approx(4.0, abs=0.05)
    assert [f.index for f in frames] == [0, 13, 25, 38, 50, 63, 75, 88]
    assert [f.timestamp_s for f in frames] == pytest.approx([f.index / 25 for f in frames], abs=1e-4)
    # frames equal the same frames decoded in order (skip/seek lands on the exact frame)
    seq, _ = read_all(sample_video.path, SamplingConfig(fps=None), allow_seek=False, decoder=decoder)
    for f in frames:
        assert f.image.dtype == np.uint8 and f.image.shape == (360, 640, 3)
        assert np.array_equal(f.image, seq[f.index].image)
    # BGR: the decoded frame matches OpenCV's decode of the same frame (OpenCV gives BGR)
    cap = cv2.VideoCapture(str(sample_video.path))
    ok, ref = cap.read()
    cap.release()
    assert ok and np.abs(ref.astype(int) - frames[0].image.astype(int)).mean() < 2.0


def test_video_reader_every_start_end_max(sample_video, decoder):
    frames, _ = read_all(sample_video.path, SamplingConfig(fps=None, every=10, start_s=1.0, end_s=3.0), decoder=decoder)
    assert [f.index for f in frames] == [25, 35, 45, 55, 65]
    frames, _ = read_all(sample_video.path, SamplingConfig(fps=5, max_frames=3), decoder=decoder)
    assert [f.index for f in frames] == [0, 5, 10]


def test_video_segments_match_unsegmented_run(sample_video, decoder):
    cfg = SamplingConfig(fps=3.0)
    whole, _ = read_all(sample_video.path, cfg, decoder=decoder)
    parts = []
    for seg in ((0.0, 1.3), (1.3, 2.0), (2.0, 99.0)):
        got, _ = read_all(sample_video.path, cfg, segment=seg, decoder=decoder)
        parts += got
    assert [f.index for f in parts] == [f.index for f in whole]
    for a, b in zip(parts, whole):
        assert a.timestamp_s == b.timestamp_s and np.array_equal(a.image, b.image)


CONTAINERS = [("mp4v", ".mov"), ("MJPG", ".avi"), ("XVID", ".avi"), ("FMP4", ".mkv"), ("VP80", ".webm"),
              ("WMV2", ".wmv"), ("PIM1", ".mpg"), ("mp4v", ".ts"), ("FLV1", ".flv")]  # fmt: skip


def decode_all(path) -> list[np.ndarray]:
    """Every frame by plain sequential ``next()`` (no skip, no seek), as BGR."""
    import decord

    vr = decord.VideoReader(str(path))
    return [vr.next().asnumpy()[:, :, ::-1] for _ in range(len(vr))]


@pytest.mark.parametrize("fourcc,ext", CONTAINERS, ids=[f"{c}{e}" for c, e in CONTAINERS])
def test_containers_sampled_frames_equal_in_order_decoding(tmp_path, fourcc, ext, decoder):
    p = tmp_path / f"clip{ext}"
    try:
        synth.make_sample_video(p, seconds=4, fps=25, size=(256, 144), fourcc=fourcc)
    except Exception as e:  # an OpenCV build without this encoder
        pytest.skip(f"OpenCV cannot write {fourcc}{ext}: {e}")
    ref = decode_all(p)
    assert len(ref) == 100
    seq, r = read_all(p, SamplingConfig(fps=None), allow_seek=False, decoder=decoder)
    assert r.frame_count == len(seq) == 100
    assert [f.timestamp_s for f in seq] == pytest.approx([i / 25 for i in range(100)], abs=2e-3)
    for every in (3, 7, 13, 30):  # within a GOP (12 frames), across one, across several
        for allow_seek in (None, False):
            sampled, _ = read_all(p, SamplingConfig(fps=None, every=every), allow_seek=allow_seek, decoder=decoder)
            assert [f.index for f in sampled] == list(range(0, 100, every))
            for f in sampled:
                assert np.array_equal(f.image, ref[f.index]), f"every={every} seek={allow_seek}: frame {f.index} differs"


def test_variable_frame_rate_uses_real_timestamps(tmp_path, decoder):
    durs = np.array([1 / 30] * 60 + [1 / 5] * 15 + [1.0] + [1 / 10] * 20)  # 2 s fast, 3 s slow, a 1 s frame
    vid = synth.make_vfr_video(tmp_path / "vfr.mp4", durs, size=(256, 144))
    frames, r = read_all(vid.path, SamplingConfig(fps=None), decoder=decoder)
    got_ts = np.array([f.timestamp_s for f in frames])
    assert got_ts == pytest.approx(vid.timestamps, abs=1e-3)
    assert r.duration_s == pytest.approx(durs.sum(), abs=0.01)
    assert abs(r.native_fps - 30.0) > 5  # the container's average is not the local rate
    sampled, _ = read_all(vid.path, SamplingConfig(fps=2.0), decoder=decoder)
    expect = sample_indices(vid.timestamps, SamplingConfig(fps=2.0))
    assert [f.index for f in sampled] == expect.tolist()
    for f in sampled:  # a sampled frame is the first one at or after its grid time
        assert np.array_equal(f.image, frames[f.index].image)
    # one frame per half second while the footage is at >= 2 fps
    fast = [f.timestamp_s for f in sampled if f.timestamp_s < 5.0]
    assert len(fast) == 10


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_metadata_is_applied(tmp_path, sample_video, degrees, decoder):
    rotated = synth.set_rotation(sample_video.path, tmp_path / f"rot{degrees}.mp4", degrees)
    plain, _ = read_all(sample_video.path, SamplingConfig(fps=1.0), decoder=decoder)
    turned, r = read_all(rotated, SamplingConfig(fps=1.0), decoder=decoder)
    code = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}[degrees]
    expect_wh = (360, 640) if degrees in (90, 270) else (640, 360)
    assert (r.width, r.height) == expect_wh
    assert [f.index for f in turned] == [f.index for f in plain]
    for a, b in zip(plain, turned):
        assert b.image.shape == (expect_wh[1], expect_wh[0], 3)
        assert np.array_equal(cv2.rotate(a.image, code), b.image)
    # OpenCV (which also honours the display matrix) agrees on the orientation
    cap = cv2.VideoCapture(str(rotated))
    assert cap.get(cv2.CAP_PROP_ORIENTATION_META) == degrees
    ok, ref = cap.read()
    cap.release()
    assert ok and ref.shape == turned[0].image.shape
    assert np.abs(ref.astype(int) - turned[0].image.astype(int)).mean() < 2.0


# ---------------------------------------------------------------------------- images
def test_images_every_format_decodes_upright_bgr(image_folder):
    ref = read_image(image_folder[0].path)  # the JPEG original (half size)
    h, w = ref.shape[:2]
    for img in image_folder:
        with MediaReader(MediaSource(img.path, "image", source_id_for(img.path)), SamplingConfig()) as r:
            frames = list(r)
        assert len(frames) == 1 and frames[0].index == 0 and frames[0].timestamp_s == 0.0
        a = frames[0].image
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3, img.path.name
        assert (r.width, r.height) == (a.shape[1], a.shape[0])
        if img.faces == 6 and "mirror" not in img.path.name:
            assert a.shape[:2] == (h, w), img.path.name
            gray_ref = cv2.cvtColor(ref, cv2.COLOR_BGR2GRAY).astype(int)
            diff = np.abs(cv2.cvtColor(a, cv2.COLOR_BGR2GRAY).astype(int) - gray_ref)
            assert np.median(diff) < 8, f"{img.path.name}: content differs from the original"


EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 64 48
%%EndComments
newpath 0 0 moveto 64 48 lineto stroke
showpage
%%EOF
"""


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png", "photo.tif"])
def test_eps_or_other_formats_named_as_images_are_refused(tmp_path, image_folder, name):
    """Pillow must not pick a decoder from the content: an EPS (Ghostscript), an ICO or a PSD
    named like an accepted image is refused from the header, naming the file and the formats
    fer-batch reads."""
    from PIL import Image

    from fer_batch.io.images import image_size

    eps = tmp_path / name
    eps.write_bytes(EPS)
    ico = tmp_path / f"icon_{name}"
    Image.open(image_folder[0].path).convert("RGB").resize((32, 32)).save(ico, format="ICO")
    for p in (eps, ico):
        with pytest.raises(DecodeError, match="not an image in a format fer-batch reads") as ei:
            image_size(p)
        assert str(p) in str(ei.value)
        with pytest.raises(DecodeError, match="JPEG, JPEG2000, PNG"):
            read_image(p)
    from fer_batch.io.images import allowed_formats

    assert "EPS" not in allowed_formats() and "ICO" not in allowed_formats()


@pytest.mark.parametrize("ext,fmt", [(".ppm", "PPM"), (".pgm", "PPM"), (".tga", "TGA"), (".jp2", "JPEG2000"), (".dib", "DIB")])
def test_every_accepted_image_extension_still_opens(tmp_path, image_folder, ext, fmt):
    from PIL import Image

    im = Image.open(image_folder[0].path).convert("L" if ext == ".pgm" else "RGB").resize((40, 30))
    p = tmp_path / f"x{ext}"
    im.save(p, format=fmt)
    assert read_image(p).shape == (30, 40, 3)
    # a JPEG named .png (a common mislabel) still opens: every accepted format is allowed
    q = tmp_path / "mislabelled.png"
    im.convert("RGB").save(q, format="JPEG")
    assert read_image(q).shape == (30, 40, 3)


def test_image_modes_converted(image_folder):
    by = {i.path.name: i.path for i in image_folder}
    ref = read_image(by["01_t1.jpg"]).astype(int)
    gray = read_image(by["05_gray.jpg"])
    assert np.array_equal(gray[:, :, 0], gray[:, :, 1]) and np.array_equal(gray[:, :, 1], gray[:, :, 2])
    g16 = read_image(by["08_gray16.png"])
    assert np.abs(g16[:, :, 0].astype(int) - cv2.cvtColor(ref.astype(np.uint8), cv2.COLOR_BGR2GRAY)).mean() < 3
    alpha = read_image(by["06_alpha.png"])
    assert alpha[:10].max() == 0  # transparent band composited on black
    assert np.abs(alpha[40:].astype(int) - ref[40:]).mean() < 3
    exif = read_image(by["07_exif_rot6.jpg"])
    assert exif.shape == ref.shape and np.abs(exif.astype(int) - ref).mean() < 4
    cmyk = read_image(by["09_cmyk.jpg"])
    assert np.abs(cmyk.astype(int) - ref).mean() < 6
    # BGR order: the mirrored PNG is the original flipped, channel for channel
    mirror = read_image(by["02_t1_mirror.png"])
    assert np.abs(mirror[:, ::-1].astype(int) - ref).mean() < 3


def test_image_sequence_reader(tmp_path, image_folder, bad_files):
    d = tmp_path / "seq"
    d.mkdir()
    for i in range(4):
        shutil.copy(image_folder[0].path, d / f"f{i}.jpg")
    cfg = SamplingConfig(images_as="sequence", image_fps=2.0, fps=1.0)
    (src,), rows = discover([d], cfg)
    with MediaReader(src, cfg) as r:
        frames = list(r)
        assert r.duration_s == pytest.approx(2.0) and r.native_fps == 2.0 and r.frame_count == 4
    assert [(f.index, f.timestamp_s) for f in frames] == [(0, 0.0), (2, 1.0)]
    # a broken image in the middle: the others are still read, then DecodeError (-> partial)
    shutil.copy(bad_files["not_image"], d / "f1.jpg")
    (src,), _ = discover([d], SamplingConfig(images_as="sequence", image_fps=2.0, fps=None))
    got = []
    with pytest.raises(DecodeError, match=r"1 of 4 images unreadable.*f1\.jpg"):
        with MediaReader(src, SamplingConfig(images_as="sequence", fps=None)) as r:
            for f in r:
                got.append(f.index)
    assert got == [0, 2, 3]


# ---------------------------------------------------------------------------- bad input
def _open_error(path, kind="video", decoder: str = "auto") -> str:
    with pytest.raises(DecodeError) as ei:
        MediaReader(MediaSource(Path(path), kind, source_id_for(path)), SamplingConfig(decoder=decoder)).open()
    msg = str(ei.value)
    assert msg.startswith(str(path)), msg
    return msg


def test_bad_missing_path(bad_files, decoder):
    sources, rows = discover([bad_files["missing"]], SamplingConfig())
    assert sources == [] and rows[0]["status"] == "failed" and "no such file" in rows[0]["error"]
    assert "no such file" in _open_error(bad_files["missing"], decoder=decoder)


def test_bad_zero_byte_file(bad_files, decoder):
    assert "empty file (0 bytes)" in _open_error(bad_files["empty"], decoder=decoder)
    assert "empty file (0 bytes)" in _open_error(bad_files["empty"], kind="image")


def test_bad_random_bytes_with_video_extension(bad_files, decoder):
    msg = _open_error(bad_files["random"], decoder=decoder)
    assert "not a readable video" in msg and "no MP4/QuickTime header" in msg


def test_bad_truncated_mp4(bad_files, decoder):
    msg = _open_error(bad_files["truncated"], decoder=decoder)  # index at the end: cut off
    assert "not a readable video" in msg and ("truncated" in msg or "moov" in msg)
    msg = _open_error(bad_files["truncated_faststart"], decoder=decoder)  # index at the front, data cut off
    assert "not a readable video" in msg and "truncated" in msg


def test_bad_corruption_in_the_middle_keeps_frames_before_it(bad_files, sample_video, decoder):
    a, b = bad_files["corrupt_range"]
    samples = synth.sample_byte_ranges(sample_video.path)
    first_hit = int(np.flatnonzero(samples[:, 0] + samples[:, 1] > a)[0])
    src = video_source(bad_files["corrupt"])
    for sampling in (SamplingConfig(fps=None), SamplingConfig()):
        got = []
        with pytest.raises(DecodeError, match="decoding failed after frame") as ei:
            with MediaReader(src, dataclasses.replace(sampling, decoder=decoder)) as r:
                for f in r:
                    got.append(f)
        assert str(ei.value).startswith(str(src.path))
        plan = sample_indices(np.arange(100) / 25, sampling)
        before = [int(i) for i in plan if i < first_hit]
        assert [f.index for f in got][: len(before)] == before  # every frame before the damage
        assert len(got) >= len(before) > 0
        last_damaged = int(np.flatnonzero(samples[:, 0] < b)[-1])
        assert got[-1].index <= last_damaged  # nothing from beyond the damage is invented
    # the kept frames are the real ones
    good, _ = read_all(sample_video.path, SamplingConfig(fps=None))
    for f in got[: len(before)]:
        assert np.array_equal(f.image, good[f.index].image)


def test_bad_image_that_is_not_an_image(bad_files):
    assert "not an image" in _open_error(bad_files["not_image"], kind="image")
    with pytest.raises(DecodeError, match="not an image"):
        read_image(bad_files["not_image"])


def test_bad_decompression_bomb_is_refused_without_decoding(bad_files):
    for key in ("bomb", "bomb_mid"):
        t0 = time.perf_counter()
        with pytest.raises(DecodeError, match="decompression-bomb guard") as ei:
            read_image(bad_files[key])
        assert time.perf_counter() - t0 < 1.0  # nothing of 10^10 (or 1.2 * 10^8) pixels was allocated
        assert str(ei.value).startswith(str(bad_files[key]))
    assert "12000x10000 (120 MP)" in _open_error(bad_files["bomb_mid"], kind="image")
    with pytest.raises(DecodeError, match="decompression-bomb"):
        with MediaReader(MediaSource(bad_files["bomb_mid"], "image", "x"), SamplingConfig()) as r:
            list(r)


def test_bad_non_media_file_in_folder_is_skipped(mixed_folder):
    sources, rows = discover([mixed_folder], SamplingConfig())
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [Path(r["path"]).name for r in skipped] == ["notes.txt"]
    assert skipped[0]["kind"] == "other"
    # every media file is a source; they fail later, one by one, when opened
    names = {s.path.name for s in sources}
    assert {"good.mp4", "empty.mp4", "random_bytes.mp4", "truncated.mp4", "corrupt_middle.mp4"} <= names
    assert {"not_an_image.jpg", "bomb.png"} <= names
    statuses = {}
    for s in sources:
        try:
            with MediaReader(s, SamplingConfig()) as r:
                n = sum(1 for _ in r)
            statuses[s.path.name] = ("ok", n)
        except DecodeError as e:
            statuses[s.path.name] = ("error", str(e))
    assert statuses["good.mp4"] == ("ok", 8)
    assert statuses["empty.mp4"][0] == "error" and statuses["bomb.png"][0] == "error"


def test_bad_unreadable_file(bad_files, decoder):
    if not bad_files["unreadable_blocks"]:
        pytest.skip("running as root: chmod 000 does not stop reads")
    sources, rows = discover([bad_files["unreadable"]], SamplingConfig())
    assert sources == [] and rows[0]["status"] == "failed" and "permission denied" in rows[0]["error"]
    assert "permission denied" in _open_error(bad_files["unreadable"], decoder=decoder)


def test_unreadable_folder_reported(tmp_path):
    d = tmp_path / "locked"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"x")
    os.chmod(d, 0)
    try:
        try:
            os.listdir(d)
            pytest.skip("running as root: chmod 000 does not stop listing")
        except PermissionError:
            pass
        sources, rows = discover([tmp_path], SamplingConfig())
        assert sources == [] and rows[0]["status"] == "failed" and "permission denied" in rows[0]["error"]
    finally:
        os.chmod(d, 0o755)


def test_truncated_image_fails_on_open(tmp_path, image_folder):
    data = image_folder[0].path.read_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt image data" in _open_error(p, kind="image")


def test_window_beyond_the_end_gives_no_frames(sample_video, decoder):
    frames, r = read_all(sample_video.path, SamplingConfig(start_s=50.0), decoder=decoder)
    assert frames == [] and r.planned_frames == 0


def test_image_sequence_segments(tmp_path, image_folder):
    d = tmp_path / "seq"
    d.mkdir()
    for i in range(6):
        shutil.copy(image_folder[0].path, d / f"f{i}.jpg")
    cfg = SamplingConfig(images_as="sequence", image_fps=2.0, fps=None)
    (src,), _ = discover([d], cfg)
    with MediaReader(src, cfg, segment=(1.0, 2.5)) as r:
        assert [(f.index, f.timestamp_s) for f in r] == [(2, 1.0), (3, 1.5), (4, 2.0)]


def test_sample_command_writes_media(tmp_path):
    from fer_batch.cli import main

    assert main(["sample", str(tmp_path / "s"), "--seconds", "1", "--size", "320x180"]) == 0
    (src,), rows = discover([tmp_path / "s" / "sample_video.mp4"], SamplingConfig())
    with MediaReader(src, SamplingConfig(fps=None)) as r:
        assert (r.width, r.height, r.frame_count) == (320, 180, 25)
    imgs, _ = discover([tmp_path / "s" / "images"], SamplingConfig())
    assert len(imgs) == 4
    assert main(["sample", str(tmp_path / "x"), "--size", "big"]) == 2
