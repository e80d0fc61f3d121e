"""Decoder backends (PyAV, decord) and the ``auto`` choice, on media generated here.

The backend-independent behaviour (sampling, VFR, rotation, segments, bad files) is tested for
both backends in ``tests/test_io.py`` (its ``decoder`` fixture); this file covers what is
specific to the backends: H.264 with B-frames (where PyAV skips non-reference frames), keyframe
seeks, containers without an index, audio-only files, the frame-size cap, the ``auto`` rule.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from fer_batch.config import SamplingConfig
from fer_batch.errors import ConfigError, DecodeError
from fer_batch.io import MediaReader, sample_indices, source_id_for
from fer_batch.io.decoders import StreamInfo, capped_size, choose_decoder, probe
from fer_batch.types import MediaSource

av = pytest.importorskip("av")


def transcode_h264(src: Path, dst: Path, *, gop: int, bframes: int, size: tuple[int, int] | None = None,
                   fmt: str | None = None, max_frames: int | None = None) -> Path:
    """Re-encode ``src`` as H.264 (libx264 in PyAV's FFmpeg) with the given GOP and B-frames."""
    with av.open(str(src)) as inp:
        vin = inp.streams.video[0]
        rate = vin.average_rate or Fraction(25)
        with av.open(str(dst), "w", format=fmt) as out:
            vs = out.add_stream("libx264", rate=rate)
            w, h = size or (vin.codec_context.width, vin.codec_context.height)
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            vs.options = {"g": str(gop), "keyint_min": str(gop), "bf": str(bframes), "sc_threshold": "0",
                          "preset": "veryfast", "crf": "23"}
            n = 0
            for frame in inp.decode(vin):
                img = frame.to_ndarray(format="rgb24")
                if size:
                    import cv2

                    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
                nf = av.VideoFrame.from_ndarray(img, format="rgb24")
                for pkt in vs.encode(nf):
                    out.mux(pkt)
                n += 1
                if max_frames and n >= max_frames:
                    break
            for pkt in vs.encode():
                out.mux(pkt)
    return dst


@pytest.fixture(scope="module")
def h264_video(sample_video, tmp_path_factory) -> Path:
    """4 s, 640x360, 25 fps H.264 High with 2 B-frames and a keyframe every 10 frames."""
    d = tmp_path_factory.mktemp("h264")
    return transcode_h264(sample_video.path, d / "bframes.mp4", gop=10, bframes=2)


def reader(path, sampling: SamplingConfig, decoder: str, **kw) -> MediaReader:
    p = Path(path)
    return MediaReader(MediaSource(p, "video", source_id_for(p)), dataclasses.replace(sampling, decoder=decoder), **kw)


def read(path, sampling: SamplingConfig, decoder: str, **kw):
    with reader(path, sampling, decoder, **kw) as r:
        return list(r), r


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(fps=0.5), SamplingConfig(fps=None, every=7),
                                      SamplingConfig(fps=None), SamplingConfig(fps=3, start_s=1.1, end_s=3.3)],
                         ids=["2fps", "0.5fps", "every7", "all", "window"])
def test_pyav_equals_decord_on_h264_with_bframes(h264_video, sampling):
    ref, rd = read(h264_video, sampling, "decord")
    got, rp = read(h264_video, sampling, "pyav")
    assert rp.decoder == "pyav" and rd.decoder == "decord"
    assert rp.frame_count == rd.frame_count == 100
    assert rp.timestamps == pytest.approx(rd.timestamps, abs=1e-4)
    assert rp.duration_s == pytest.approx(rd.duration_s, abs=1e-3)
    assert [f.index for f in got] == [f.index for f in ref] == rp.plan.tolist()
    for a, b in zip(ref, got):
        assert a.timestamp_s == pytest.approx(b.timestamp_s, abs=1e-4)
        assert b.image.shape == a.image.shape == (360, 640, 3)
        assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() < 1.0, f"frame {a.index} differs"


def test_pyav_skips_frames_nobody_needs(h264_video):
    """Sparse sampling decodes only reference frames and planned ones (a count, not a timing)."""
    frames, r = read(h264_video, SamplingConfig(fps=2.0), "pyav")
    assert len(frames) == 8
    assert r.frames_decoded < 0.7 * r.frame_count
    frames, r = read(h264_video, SamplingConfig(fps=0.25), "pyav")  # interval 4 s > GOP 0.4 s
    assert [f.index for f in frames] == [0]
    assert r.frames_decoded <= 10  # one GOP at most
    _, r = read(h264_video, SamplingConfig(fps=None), "pyav")
    assert r.frames_decoded == 100


@pytest.mark.parametrize("seek", [True, False])
def test_pyav_keyframe_seeks_land_on_the_planned_frames(sample_video, tmp_path, seek):
    long = transcode_h264(sample_video.path, tmp_path / "gop5.mkv", gop=5, bframes=2)
    cfg = SamplingConfig(fps=None, every=23)  # every planned frame in a different, distant GOP
    ref, _ = read(long, SamplingConfig(fps=None), "decord", allow_seek=False)
    got, r = read(long, cfg, "pyav", allow_seek=seek)
    assert [f.index for f in got] == list(range(0, 100, 23))
    for f in got:
        assert np.abs(f.image.astype(int) - ref[f.index].image.astype(int)).mean() < 1.0
    assert r.frames_decoded <= 5 * len(got)


def test_mpegts_without_index(sample_video, tmp_path):
    """MPEG-TS has no index: GOPs are skipped by reading on. Each delivered frame is the right
    one (the re-encoded source frame it is closest to has its index). decord 0.6.0 returns
    these frames one GOP late on such a file (its frame 0 is the source's frame 12)."""
    ts = transcode_h264(sample_video.path, tmp_path / "clip.ts", gop=12, bframes=2, fmt="mpegts")
    src, rs = read(sample_video.path, SamplingConfig(fps=None), "decord")
    for cfg in (SamplingConfig(), SamplingConfig(fps=None, every=30)):
        got, r = read(ts, cfg, "pyav")
        assert r.timestamps == pytest.approx(rs.timestamps, abs=1e-3)
        assert [f.index for f in got] == sample_indices(rs.timestamps, cfg).tolist()
        for f in got:
            err = [np.abs(f.image.astype(int) - s.image.astype(int)).mean() for s in src]
            assert int(np.argmin(err)) == f.index and min(err) < 3.0


def test_audio_only_file_is_a_clear_error(tmp_path):
    p = tmp_path / "voice.mp4"
    with av.open(str(p), "w") as out:
        st = out.add_stream("aac", rate=16000)
        st.layout = "mono"
        for k in range(20):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, k * 1024
            for pkt in st.encode(fr):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    for decoder in ("decord", "pyav", "auto"):
        with pytest.raises(DecodeError) as ei:
            reader(p, SamplingConfig(), decoder).open()
        assert str(ei.value).startswith(str(p))
    with pytest.raises(DecodeError, match="no video stream"):
        reader(p, SamplingConfig(), "pyav").open()


def test_auto_choice_rule(h264_video, tmp_path):
    info = probe(h264_video)
    assert info == StreamInfo(codec="h264", width=640, height=360, frames=100, avg_fps=25.0, has_pts=True)
    assert choose_decoder("auto", SamplingConfig(), info)[0] == "pyav"  # 12.5 frames per sample
    assert choose_decoder("auto", SamplingConfig(fps=None, every=3), info)[0] == "pyav"
    # dense: PyAV too (faster decode-every-frame rate, bounded memory); the reason says dense
    assert choose_decoder("auto", SamplingConfig(fps=None, every=1), info)[0] == "pyav"
    assert "dense" in choose_decoder("auto", SamplingConfig(fps=None), info)[1]
    assert "dense" in choose_decoder("auto", SamplingConfig(fps=20.0), info)[1]  # 1.25 frames per sample
    assert choose_decoder("decord", SamplingConfig(), info) == ("decord", "requested")
    assert choose_decoder("auto", SamplingConfig(), None)[0] == "decord"
    # a raw H.264 elementary stream has no timestamps of its own: decord
    raw = tmp_path / "raw.h264"
    transcode_h264(h264_video, raw, gop=10, bframes=0, fmt="h264", max_frames=20)
    assert probe(raw).has_pts is False
    assert choose_decoder("auto", SamplingConfig(), probe(raw))[0] == "decord"
    # what the reader used is reported
    _, r = read(h264_video, SamplingConfig(), "auto")
    assert r.decoder == "pyav" and "sparse" in r.decoder_reason
    with pytest.raises(ConfigError, match="--decoder"):
        SamplingConfig(decoder="ffmpeg")


# ---------------------------------------------------------------------------- frame size cap
def test_capped_size():
    assert capped_size(640, 360, 640 * 360) == (640, 360)
    assert capped_size(7680, 4320, 4096 * 2160) == (3964, 2230)
    w, h = capped_size(7680, 4320, 4096 * 2160)
    assert w * h <= 4096 * 2160 and abs(w / h - 16 / 9) < 0.01


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_frames_over_the_pixel_cap_are_scaled_down_in_the_decoder(sample_video, decoder):
    cfg = SamplingConfig(max_frame_pixels=320 * 180)
    frames, r = read(sample_video.path, cfg, decoder)
    assert (r.width, r.height) == (320, 180) and (r.source_width, r.source_height) == (640, 360)
    assert r.scale == pytest.approx(0.5)
    assert [f.index for f in frames] == [0, 13, 25, 38, 50, 63, 75, 88]
    full, _ = read(sample_video.path, SamplingConfig(), decoder)
    for a, b in zip(full, frames):
        import cv2

        small = cv2.resize(a.image, (320, 180), interpolation=cv2.INTER_AREA)
        assert b.image.shape == (180, 320, 3)
        assert np.abs(small.astype(int) - b.image.astype(int)).mean() < 6.0


_RSS_CHILD = r"""
import json, sys
from pathlib import Path
from fer_batch.config import SamplingConfig
from fer_batch.io import MediaReader
from fer_batch.types import MediaSource
p = Path(sys.argv[1])
with MediaReader(MediaSource(p, "video", "x"), SamplingConfig(fps=None, decoder=sys.argv[2])) as r:
    shapes = [f.image.shape for f in r]
# VmHWM: this process's own peak (getrusage's ru_maxrss keeps the parent's across exec on Linux)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"n": len(shapes), "shape": shapes[0], "src": [r.source_width, r.source_height], "rss_mb": hwm / 1024}))
"""


@pytest.mark.slow
def test_8k_video_decodes_capped_within_memory(sample_video, tmp_path):
    big = transcode_h264(sample_video.path, tmp_path / "8k.mp4", gop=4, bframes=2, size=(7680, 4320), max_frames=6)
    for decoder in ("pyav", "decord"):
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(big), decoder], capture_output=True, text=True,
                             check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["n"] == 6 and res["src"] == [7680, 4320]
        assert res["shape"][0] * res["shape"][1] <= 4096 * 2160
        assert res["rss_mb"] < 1500, (decoder, res)


# ---------------------------------------------------------------------------- through the pipeline
def test_pipeline_rows_equal_across_backends_and_capped_boxes_in_stored_pixels(sample_video, tmp_path):
    """PyAV and decord give the same rows; with frames scaled down by the pixel cap, boxes are
    still in the stored video's pixels. The run configuration (decoder included) is recorded."""
    from fer_batch.api import run
    from fer_batch.schema import read_metadata

    import pyarrow.parquet as pq

    runs = {d: run([sample_video.path], out=tmp_path / f"{d}.parquet", device="cpu", decoder=d, max_frames=4)
            for d in ("decord", "pyav")}
    a, b = (runs[d].faces.sort_by([("frame_index", "ascending"), ("x1", "ascending")]) for d in ("decord", "pyav"))
    assert a.num_rows == b.num_rows > 0
    assert a.column("frame_index").to_pylist() == b.column("frame_index").to_pylist()
    np.testing.assert_allclose(a.column("x1").to_numpy(), b.column("x1").to_numpy(), atol=0.5)
    np.testing.assert_allclose(a.column("p_happy").to_numpy(), b.column("p_happy").to_numpy(), atol=0.02)
    assert read_metadata(pq.read_schema(tmp_path / "pyav.parquet"))["config"]["sampling"]["decoder"] == "pyav"
    small = run([sample_video.path], device="cpu", decoder="pyav", max_frames=4, max_frame_pixels=320 * 180)
    c = small.faces.sort_by([("frame_index", "ascending"), ("x1", "ascending")])
    assert c.num_rows == b.num_rows
    for col in ("x1", "y1", "x2", "y2"):  # a 2x smaller frame: within a few stored pixels
        np.testing.assert_allclose(c.column(col).to_numpy(), b.column(col).to_numpy(), atol=8.0)
