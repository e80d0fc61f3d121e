"""Review reports: figures (pure functions), Parquet loading, HTML, thumbnails, CLI, and the page
in a real headless browser (Debian's chromium; skipped when it is not installed).

The input tables are built with ``fer_batch.schema.faces_to_table`` from FaceDetections whose
probabilities follow an emotion timeline constructed here; the expected figures are worked
out by hand from that construction (comments give the arithmetic), not by the code under test.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fer_batch.errors import ConfigError, DataError, InputError
from fer_batch.report import build_report, load_report, summarize
from fer_batch.report.figures import (
    MomentParams,
    count_changes,
    find_peaks,
    sampling_period,
    session_figures,
    source_figures,
    sustained_stretches,
)
from fer_batch.schema import (
    PROB_COLUMNS,
    SMOOTH_COLUMNS,
    SOURCES_SCHEMA,
    faces_to_table,
    rows_to_table,
    tracks_table,
    with_metadata,
)
from fer_batch.types import EMOTIONS, FaceDetections

# ----------------------------------------------------------------------------- fixtures

FPS_VIDEO = 25  # frame_index = round(t * 25)


def _probs(label: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A probability vector with ``strength`` on ``label``, the rest spread evenly, plus a
    little noise (+-0.01) so values look like a classifier's, renormalised."""
    p = np.full(7, (1.0 - strength) / 6.0)
    p[EMOTIONS.index(label)] = strength
    p = np.clip(p + rng.uniform(-0.01, 0.01, 7), 1e-4, None)
    return p / p.sum()


def _dets(times: np.ndarray, labels: list[tuple[str, float]], track_id: int, box, rng) -> FaceDetections:
    n = len(times)
    x1, y1, x2, y2 = box
    xyxy = np.tile(np.array([x1, y1, x2, y2], np.float32), (n, 1))
    kps = np.tile(np.array([[x1 + 0.3 * (x2 - x1), y1 + 0.4 * (y2 - y1)]] * 5, np.float32), (n, 1, 1))
    return FaceDetections(
        frame_index=np.round(times * FPS_VIDEO).astype(np.int64),
        timestamp_s=times,
        xyxy=xyxy,
        det_score=np.full(n, 0.95, np.float32),
        kps=kps,
        track_id=np.full(n, track_id, np.int64),
        probs=np.stack([_probs(lab, s, rng) for lab, s in labels]).astype(np.float32),
    )


def face_a(rng) -> FaceDetections:
    """Track 1 of source 1: 0-60 s at 2 fps (120 samples): neutral (0-20 s), happy (20-40 s),
    sad (40-60 s, p=0.75), and one angry spike (p=0.9) at t=10.0 s."""
    t = np.arange(0, 60, 0.5)
    labels = []
    for x in t:
        if x == 10.0:
            labels.append(("angry", 0.9))
        elif x < 20:
            labels.append(("neutral", 0.8))
        elif x < 40:
            labels.append(("happy", 0.8))
        else:
            labels.append(("sad", 0.75))
    return _dets(t, labels, 1, (100, 80, 180, 180), rng)


def face_b(rng) -> FaceDetections:
    """Track 2 of source 1: 5-55 s at 2 fps (100 samples): neutral (0.7), surprise at 30.0 s
    (0.85) and 30.5 s (0.8), fear 45-50 s (0.65, 10 samples)."""
    t = np.arange(5, 55, 0.5)
    labels = []
    for x in t:
        if x == 30.0:
            labels.append(("surprise", 0.85))
        elif x == 30.5:
            labels.append(("surprise", 0.8))
        elif 45 <= x < 50:
            labels.append(("fear", 0.65))
        else:
            labels.append(("neutral", 0.7))
    return _dets(t, labels, 2, (300, 90, 370, 180), rng)


def face_c(rng) -> FaceDetections:
    """Track 7 of source 2: 0-30 s at 1 fps (30 samples), happy (0.9) throughout."""
    t = np.arange(0, 30, 1.0)
    return _dets(t, [("happy", 0.9)] * len(t), 7, (50, 50, 120, 140), rng)


def _sources_rows(paths: dict[str, str]) -> list[dict]:
    return [
        dict(source_id="s1", path=paths["s1"], kind="video", status="ok", error=None, duration_s=60.0,
             frames_sampled=120, faces=220, tracks=2, wall_s=4.0),
        dict(source_id="s2", path=paths["s2"], kind="video", status="ok", error=None, duration_s=30.0,
             frames_sampled=30, faces=30, tracks=1, wall_s=1.0),
        dict(source_id="s3", path=paths["s3"], kind="video", status="failed",
             error=f"{paths['s3']}: moov atom not found", duration_s=None, frames_sampled=0, faces=0, tracks=0, wall_s=0.1),
    ]  # fmt: skip


def write_session(directory: Path, paths: dict[str, str] | None = None, smoothed_s1: bool = False) -> Path:
    """Write report.parquet / .sources.parquet / .tracks.parquet of a 3-source session."""
    rng = np.random.default_rng(0)
    paths = paths or {"s1": "/data/sessions/alice.mp4", "s2": "/data/sessions/bob.mp4", "s3": "/data/sessions/broken.mp4"}
    d1 = FaceDetections.concat([face_a(rng), face_b(rng)])
    smoothed = None
    if smoothed_s1:
        # a centred 5-sample moving average along each track (what --smooth 2.5 would do)
        smoothed = np.zeros_like(d1.probs)
        for tid in (1, 2):
            m = d1.track_id == tid
            p = d1.probs[m]
            k = np.ones(5) / 5
            padded = np.pad(p, ((2, 2), (0, 0)), mode="edge")
            smoothed[m] = np.stack([np.convolve(padded[:, j], k, mode="valid") for j in range(7)], 1)
    t1 = faces_to_table("s1", paths["s1"], d1, smoothed)
    t2 = faces_to_table("s2", paths["s2"], face_c(rng))
    faces = with_metadata(pa.concat_tables([t1, t2]), version="0.1.0", models={"classify": {"name": "test-cnn"}}, config={})
    out = directory / "report.parquet"
    pq.write_table(faces, out)
    pq.write_table(rows_to_table(_sources_rows(paths), SOURCES_SCHEMA), directory / "report.sources.parquet")
    pq.write_table(tracks_table(faces), directory / "report.tracks.parquet")
    return out


@pytest.fixture()
def session(tmp_path: Path) -> Path:
    return write_session(tmp_path)


# ----------------------------------------------------------------------------- building blocks


def test_sampling_period_and_changes():
    assert sampling_period(np.array([0.0, 0.5, 0.5, 1.0, 2.0])) == 0.5  # gaps 0.5, 0.5, 1.0 -> median 0.5
    assert sampling_period(np.array([3.0])) == 0.0
    labels = np.array(["neutral"] * 4 + ["angry"] + ["neutral"] * 3 + ["happy"] * 2 + ["sad"] * 6)
    # at dt=0.5: the 1-sample angry (0.5 s) is below a 1 s dwell -> neutral, happy, sad: 2 changes
    assert count_changes(labels, 0.5, 1.0) == 2
    # every change counts at dwell 0: neutral>angry>neutral>happy>sad
    assert count_changes(labels, 0.5, 0.0) == 4
    # at 2 s dwell the happy run (1 s) goes too
    assert count_changes(labels, 0.5, 2.0) == 1


def test_find_peaks_separation_plateau_and_edges():
    t = np.arange(0, 20, 0.5)
    v = np.full(len(t), 0.1)
    v[4], v[6] = 0.9, 0.7  # 2.0 s and 3.0 s: 1 s apart
    v[20:24] = 0.8  # plateau 10.0-11.5 s -> one peak in its middle
    v[-1] = 0.65  # last sample can peak
    assert [t[i] for i in find_peaks(t, v, 0.6, 5.0, 10)] == [2.0, 10.5, 19.5]
    assert [t[i] for i in find_peaks(t, v, 0.6, 0.5, 10)] == [2.0, 3.0, 10.5, 19.5]
    assert [t[i] for i in find_peaks(t, v, 0.6, 0.5, 2)] == [2.0, 10.5]  # the 2 strongest
    assert find_peaks(t, v, 0.95, 1.0, 10) == []


def test_local_maxima():
    from fer_batch.report.figures import local_maxima

    assert local_maxima(np.array([0.9, 0.1, 0.5, 0.5, 0.5, 0.2, 0.3, 0.3, 0.6])).tolist() == [0, 3, 8]
    assert local_maxima(np.array([0.2, 0.2, 0.2])).tolist() == [1]  # all flat: one peak mid-way
    assert local_maxima(np.array([0.1, 0.3, 0.3, 0.5])).tolist() == [3]  # a shoulder is no peak
    assert local_maxima(np.array([])).tolist() == []


def test_sustained_stretches_gap_and_duration():
    t = np.array([0, 0.5, 1, 1.5, 2, 2.5, 6, 6.5, 7, 7.5, 8, 8.5, 9])
    v = np.array([0.6, 0.7, 0.6, 0.8, 0.6, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    # first stretch: 0-2.0 s -> 2.5 s long (5 samples x 0.5); second: 6-9 s -> 3.5 s
    assert sustained_stretches(t, v, 0.5, 2.5, 0.5, 1.25) == [(0, 4), (6, 12)]
    assert sustained_stretches(t, v, 0.5, 3.0, 0.5, 1.25) == [(6, 12)]
    # a gap of 3.5 s inside an above-threshold run breaks it when max_gap is smaller
    v2 = np.full(len(t), 0.9)
    assert sustained_stretches(t, v2, 0.5, 0.0, 0.5, 1.25) == [(0, 5), (6, 12)]
    assert sustained_stretches(t, v2, 0.5, 0.0, 0.5, 4.0) == [(0, 12)]


def test_params_validation():
    with pytest.raises(ConfigError, match="peak_threshold"):
        MomentParams(peak_threshold=1.5)
    with pytest.raises(ConfigError, match="sustain_min_s"):
        MomentParams(sustain_min_s=-1)


# ----------------------------------------------------------------------------- figures


def _faces_df(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def test_track_and_source_figures(session: Path):
    faces = _faces_df(session)
    sf = source_figures(faces[faces.source_id == "s1"], {"source_id": "s1", "path": "/x.mp4", "status": "ok", "duration_s": 60.0})
    assert sf.dt == 0.5 and sf.rows == 220 and sf.faces == 2 and not sf.smoothed
    a, b = sf.tracks
    assert (a.track_id, a.rows, a.first_s, a.last_s) == (1, 120, 0.0, 59.5)
    # A: neutral 39 samples (40 minus the spike), angry 1, happy 40, sad 40, of 120
    assert a.shares["neutral"] == pytest.approx(39 / 120)
    assert a.shares["angry"] == pytest.approx(1 / 120)
    assert a.shares["happy"] == pytest.approx(40 / 120)
    assert a.shares["sad"] == pytest.approx(40 / 120)
    assert a.valence["negative"] == pytest.approx(41 / 120)
    assert a.face_time_s == pytest.approx(60.0)
    # neutral -> happy -> sad (the 0.5 s spike is below the 1 s dwell): 2 changes in 1 minute
    assert a.changes == 2 and a.changes_per_min == pytest.approx(2.0)
    kinds = [(m.kind, m.emotion) for m in a.moments]
    assert kinds == [("peak", "angry"), ("sustained", "sad")]
    peak, sad = a.moments
    assert peak.time_s == 10.0 and peak.frame_index == 250 and peak.value == pytest.approx(0.9, abs=0.02)
    assert (sad.start_s, sad.end_s, sad.duration_s) == (40.0, 59.5, 20.0)
    assert sad.mean == pytest.approx(0.75, abs=0.01)
    assert sad.box == (100.0, 80.0, 180.0, 180.0)

    # B: 100 samples: neutral 88, surprise 2, fear 10; changes n>s>n>f>n = 4 in 50 s
    assert (b.track_id, b.rows, b.first_s, b.last_s) == (2, 100, 5.0, 54.5)
    assert b.shares["neutral"] == pytest.approx(0.88)
    assert b.shares["surprise"] == pytest.approx(0.02)
    assert b.shares["fear"] == pytest.approx(0.10)
    assert b.changes == 4 and b.changes_per_min == pytest.approx(4 / (50 / 60))
    assert [(m.kind, m.emotion, m.start_s) for m in b.moments] == [("surprise", "surprise", 30.0), ("sustained", "fear", 45.0)]
    fear = b.moments[1]
    assert (fear.end_s, fear.duration_s) == (49.5, 5.0)
    assert b.moments[0].value == pytest.approx(0.85, abs=0.02)

    # source: 220 samples of 0.5 s; 6 changes in 110 face-seconds
    assert sf.face_time_s == pytest.approx(110.0)
    assert sf.shares["neutral"] == pytest.approx((39 + 88) / 220)
    assert sf.changes == 6 and sf.changes_per_min == pytest.approx(6 / (110 / 60))
    assert sf.duration_s == 60.0 and sf.dominant == "neutral"
    assert [m.start_s for m in sf.moments] == [10.0, 30.0, 40.0, 45.0]


def test_session_figures_weights_by_sampling_period(session: Path):
    data = load_report(session)
    figs = session_figures(data.faces, data.sources)
    assert [s.source_id for s in figs.sources] == ["s1", "s2", "s3"]
    s1, s2, s3 = figs.sources
    assert s2.dt == 1.0 and s2.shares["happy"] == 1.0 and s2.changes == 0 and s2.moments == []
    assert (s3.status, s3.rows, s3.faces) == ("failed", 0, 0) and "moov" in s3.error
    # face time: s1 220 x 0.5 s = 110 s, s2 30 x 1 s = 30 s
    assert figs.face_time_s == pytest.approx(140.0)
    assert figs.shares["happy"] == pytest.approx((40 * 0.5 + 30 * 1.0) / 140)
    assert figs.valence["positive"] == pytest.approx(50 / 140)
    assert figs.valence["negative"] == pytest.approx((1 + 40 + 10) * 0.5 / 140)
    assert figs.valence["neutral"] == pytest.approx((39 + 88) * 0.5 / 140)
    assert figs.valence["surprise"] == pytest.approx(2 * 0.5 / 140)
    assert figs.changes_per_min == pytest.approx(6 / (140 / 60))
    assert figs.duration_s == 90.0 and figs.faces == 3 and figs.rows == 250
    assert figs.status_counts == {"ok": 2, "partial": 0, "failed": 1, "skipped": 0}
    row = s1.summary_row()
    assert row["top_negative"].startswith("angry 0.9") and row["key_moments"] == 4 and row["negative_moments"] == 3


def test_smoothed_columns_are_used_when_present(tmp_path: Path):
    path = write_session(tmp_path, smoothed_s1=True)
    data = load_report(path)
    assert all(c in data.faces.columns for c in SMOOTH_COLUMNS)
    s1 = session_figures(data.faces, data.sources).sources[0]
    a = s1.tracks[0]
    assert s1.smoothed
    # the one-sample angry spike averages to about 0.9/5 + 4 x 0.017/5 = 0.19: no angry sample or peak
    assert a.shares["angry"] == 0.0
    assert all(m.emotion != "angry" for m in a.moments)
    # raw values are still there and unchanged
    raw = data.faces[(data.faces.source_id == "s1") & (data.faces.timestamp_s == 10.0) & (data.faces.track_id == 1)]
    assert float(raw["p_angry"].iloc[0]) == pytest.approx(0.9, abs=0.02)


def test_thresholds_change_the_moments(session: Path):
    data = load_report(session)
    strict = session_figures(data.faces, data.sources, MomentParams(peak_threshold=0.95, sustain_min_s=6.0, surprise_threshold=0.9))
    # no peak reaches 0.95, the fear stretch (5 s) is shorter than 6 s, surprise 0.85 < 0.9: only sad remains
    assert [(m.kind, m.emotion) for m in strict.sources[0].moments] == [("sustained", "sad")]
    loose = session_figures(data.faces, data.sources, MomentParams(min_dwell_s=0.0))
    assert loose.sources[0].tracks[0].changes == 4  # the spike counts: n>a>n>h>s


# ----------------------------------------------------------------------------- loading


def test_load_errors(tmp_path: Path):
    with pytest.raises(InputError, match="no such file"):
        load_report(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="bad.parquet"):
        load_report(bad)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), other)
    with pytest.raises(DataError, match="missing columns"):
        load_report(other)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="without Parquet files"):
        load_report(empty_dir)


def test_load_without_sources_table(session: Path):
    session.with_name("report.sources.parquet").unlink()
    data = load_report(session)
    assert data.sources is None
    figs = summarize(data)
    assert [s.source_id for s in figs.sources] == ["s1", "s2"]  # only sources with faces
    assert figs.sources[0].duration_s == pytest.approx(60.0)  # span 0-59.5 s + one period


# ----------------------------------------------------------------------------- HTML


def _sections(text: str) -> dict[str, str]:
    return dict(re.findall(r'<section data-title="[^"]*" class="source" id="([^"]+)" hidden>(.*?)</section>', text, re.S))


def test_html_is_self_contained(session: Path, tmp_path: Path):
    out = tmp_path / "review.html"
    figs = build_report(session, out)
    text = out.read_text()
    # nothing fetched from anywhere: no external src/href/url()/import, and a CSP that forbids it
    assert "default-src 'none'" in text
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', text)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", text)
    assert "@import" not in text and "<link" not in text
    assert "data:image" not in text  # no thumbnails unless asked for
    secs = _sections(text)
    assert len(secs) == 3 == len(figs.sources)
    # one timeline plot per face: s1 has 2, s2 has 1, s3 (failed) none and shows its error
    counts = sorted(s.count('<div class="plot"><svg') for s in secs.values())
    assert counts == [0, 1, 2]
    assert any("moov atom not found" in s for s in secs.values())
    # the index table lists every source with a link to its section
    for sid in secs:
        assert f'href="#{sid}"' in text
    # key moments with timestamps
    s1 = next(s for s in secs.values() if "alice.mp4" in s)
    assert "sustained" in s1 and "40.0 s" in s1 and "59.5 s" in s1 and "strongest surprise" in s1
    # unique ids across the inlined SVGs
    ids = re.findall(r'\sid="([^"]+)"', text)
    assert len(ids) == len(set(ids))


def test_html_output_errors(session: Path, tmp_path: Path):
    from fer_batch.errors import OutputError

    with pytest.raises(OutputError, match="does not exist"):
        build_report(session, tmp_path / "no" / "dir" / "r.html")
    with pytest.raises(ConfigError):
        build_report(session, tmp_path / "r.html", per_page=0)


def test_thumbnails_cut_from_real_video(tmp_path: Path):
    """Thumbnails come from the right frame and box of a real video; a missing source file is a
    note, not a crash."""
    from fer_batch.synth import make_sample_video

    video = make_sample_video(tmp_path / "faces.mp4", seconds=4, fps=25, size=(640, 360))
    rng = np.random.default_rng(1)
    t = np.arange(0, 4, 0.5)
    fi = np.round(t * 25).astype(np.int64)
    parts = []
    for f in (0, 3):  # two of the six faces, ground-truth boxes of the synthetic video
        # a sad stretch for face 0 (whole clip), a surprise at 2.0 s for face 3
        labels = [("sad", 0.8)] * len(t) if f == 0 else [("surprise", 0.9) if x == 2.0 else ("neutral", 0.8) for x in t]
        parts.append(FaceDetections(
            fi, t, video.boxes[fi, f], np.full(len(t), 0.9, np.float32), video.kps[fi, f],
            np.full(len(t), f, np.int64), np.stack([_probs(lb, s, rng) for lb, s in labels]).astype(np.float32),
        ))  # fmt: skip
    dets = FaceDetections.concat(parts)
    faces = pa.concat_tables(
        [faces_to_table("v", str(video.path), dets), faces_to_table("gone", str(tmp_path / "gone.mp4"), dets)]
    )
    rep = tmp_path / "r.parquet"
    pq.write_table(faces, rep)
    out = tmp_path / "r.html"
    figs = build_report(rep, out, thumbnails=True)
    text = out.read_text()
    secs = _sections(text)
    real = next(s for s in secs.values() if "faces.mp4" in s)
    gone = next(s for s in secs.values() if "gone.mp4" in s)
    assert "source file not found" in gone and "data:image" not in gone
    uris = re.findall(r'<img class="thumb" alt="face (\d+) at ([\d.]+) s" src="data:image/jpeg;base64,([^"]+)"', real)
    moments = figs.sources[0].moments
    assert len(uris) == len(moments) == 2  # sustained sad (face 0), strongest surprise (face 3)

    import decord

    vr = decord.VideoReader(str(video.path))
    for track, ts, b64 in uris:
        im = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.float32)
        assert max(im.shape[:2]) <= 96
        k = int(round(float(ts) * 25))
        x1, y1, x2, y2 = video.boxes[k, int(track)]
        frame = vr[k].asnumpy()
        # the expected crop: the face box grown by 25% per side, resized like the thumbnail
        mx, my = 0.25 * (x2 - x1), 0.25 * (y2 - y1)
        crop = frame[int(max(0, y1 - my)) : int(min(360, y2 + my)), int(max(0, x1 - mx)) : int(min(640, x2 + mx))]
        want = np.asarray(Image.fromarray(crop).resize(im.shape[1::-1], Image.Resampling.BILINEAR)).astype(np.float32)
        other = np.asarray(Image.fromarray(frame[:crop.shape[0], :crop.shape[1]]).resize(im.shape[1::-1])).astype(np.float32)
        err = np.abs(im - want).mean()
        assert err < 12, err  # JPEG + resampling differences only
        assert np.abs(im - other).mean() > 2 * err  # and clearly not some other part of the frame


def _owned_bytes(a: np.ndarray) -> int:
    """Bytes of the buffer behind ``a`` (its base chain's root when it is a view)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a.nbytes


def test_thumbnail_frames_are_decoded_one_at_a_time(tmp_path: Path):
    """Each frame handed to the cropper owns only its own pixels (no batch of up to 40 full
    frames behind it), frames come in increasing order, and out-of-range indices are left out."""
    from fer_batch.report.thumbs import iter_frames
    from fer_batch.synth import make_sample_video

    video = make_sample_video(tmp_path / "v.mp4", seconds=1.2, fps=25, size=(320, 192))
    got = []
    for i, frame in iter_frames(video.path, [20, 3, 9, 3, 10_000]):
        assert frame.shape == (192, 320, 3)
        assert _owned_bytes(frame) == frame.nbytes, (i, _owned_bytes(frame), frame.nbytes)
        got.append(i)
    assert got == [3, 9, 20]


@pytest.mark.parametrize("umask", [0o077, 0o022, 0o002])
def test_report_file_honours_umask(session: Path, tmp_path: Path, umask: int):
    out = tmp_path / f"r{umask:o}.html"
    old = os.umask(umask)
    try:
        build_report(session, out)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (the interpreter running the tests), a wide terminal."""
    import sys

    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "fer_batch.cli", *args], capture_output=True, text=True, timeout=120, env=env)


def test_summary_cli_formats(session: Path):
    from fer_batch.cli import main  # in-process: the same entry point as the console script

    r = _cli("summary", str(session), "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    figs = summarize(session)
    assert doc["session"]["share_positive"] == pytest.approx(50 / 140, abs=1e-4)
    assert doc["session"]["faces"] == 3 and doc["session"]["sources_failed"] == 1
    assert [s["source_id"] for s in doc["sources"]] == ["s1", "s2", "s3"]
    assert len(doc["moments"]) == sum(len(s.moments) for s in figs.sources) == 4
    assert doc["params"]["peak_threshold"] == 0.6

    r = _cli("summary", str(session), "--format", "csv", "--peak-threshold", "0.95")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(io.StringIO(r.stdout))
    assert list(df.source_id) == ["s1", "s2", "s3"]
    assert df.loc[0, "negative_moments"] == 2  # the angry peak (0.9) is gone at 0.95
    assert df.loc[0, "changes_per_min"] == pytest.approx(6 / (110 / 60), abs=1e-3)

    r = _cli("summary", str(session))
    assert r.returncode == 0, r.stderr
    assert "alice.mp4" in r.stdout and "changes per minute" in r.stdout and "angry 0.90 @10.0s" in r.stdout
    assert "broken.mp4 (failed): /data/sessions/broken.mp4: moov atom not found" in r.stdout

    r = _cli("summary", str(session.with_name("missing.parquet")))
    assert r.returncode == 1 and "no such file" in r.stderr
    r = _cli("summary", str(session), "--peak-threshold", "2")
    assert r.returncode == 2 and "peak_threshold" in r.stderr
    assert callable(main)


def test_report_cli(session: Path, tmp_path: Path):
    out = tmp_path / "review.html"
    r = _cli("report", str(session), "--html", str(out), "--max-sources-per-page", "2")
    assert r.returncode == 0, r.stderr
    assert "3 sources" in r.stderr and out.exists()
    assert 'data-per-page="2"' in out.read_text()


# ----------------------------------------------------------------------------- real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless chromium driven over the DevTools protocol on a pipe (fds 3/4, no network port,
    no extra Python package)."""

    def __init__(self, user_data_dir: Path):
        r_cmd, self._w = os.pipe()  # we write commands -> chromium reads fd 3
        self._r, w_evt = os.pipe()  # chromium writes fd 4 -> we read

        def _fds():
            a, b = os.dup(r_cmd), os.dup(w_evt)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--mute-audio", "--hide-scrollbars", "--remote-debugging-pipe",
                f"--user-data-dir={user_data_dir}", "about:blank",
            ],
            preexec_fn=_fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(r_cmd)
        os.close(w_evt)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def _recv(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0, browser: bool = False) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._recv(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for m in self.events:
            if m.get("method") == method:
                self.events.remove(m)
                return m
        while True:
            m = self._recv(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def open_page(self, width: int = 1280, height: int = 1400) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, browser=True)["sessionId"]
        for dom in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{dom}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def eval(self, expr: str):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self) -> np.ndarray:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    def close(self) -> None:
        try:
            self.send("Browser.close", browser=True, timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _hex_rgb(h: str) -> np.ndarray:
    return np.array([int(h[i : i + 2], 16) for i in (1, 3, 5)], np.int16)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_in_headless_chromium(session: Path, tmp_path: Path):
    from fer_batch.report.plots import EMOTION_COLORS

    out = tmp_path / "review.html"
    build_report(session, out, per_page=2)
    url = out.resolve().as_uri()
    with tempfile.TemporaryDirectory() as ud:
        b = Chromium(Path(ud))
        try:
            b.open_page()
            b.send("Page.navigate", {"url": url})
            b.wait_event("Page.loadEventFired")
            assert b.eval("document.documentElement.getAttribute('data-ready')") == "1"

            # index view: paged 2 rows of 3, sort and filter work
            rows = "Array.from(document.querySelectorAll('#src-table tbody tr')).map(r => r.cells[0].textContent)"
            assert b.eval(rows) == ["alice.mp4", "bob.mp4"]
            assert "of 3" in b.eval("document.getElementById('count').textContent")
            b.eval("document.querySelector('#pager button:last-child').click()")
            assert b.eval(rows) == ["broken.mp4"]
            faces_th = "document.querySelectorAll('#src-table th')[3]"
            b.eval(f"{faces_th}.click()")  # ascending by faces: broken 0, bob 1, alice 2
            assert b.eval(rows) == ["broken.mp4", "bob.mp4"]
            b.eval(f"{faces_th}.click()")
            assert b.eval(rows) == ["alice.mp4", "bob.mp4"]
            b.eval("const f = document.getElementById('filter'); f.value = 'failed'; f.dispatchEvent(new Event('input'))")
            assert b.eval(rows) == ["broken.mp4"]
            b.eval("const g = document.getElementById('filter'); g.value = ''; g.dispatchEvent(new Event('input'))")

            # follow the link of the first source: its view replaces the index
            b.eval("document.querySelector('#src-table tbody tr a').click()")
            time.sleep(0.3)
            state = b.eval(
                "(() => { const s = document.querySelector('section.source:not([hidden])');"
                " return {index: document.getElementById('index').hidden, id: s && s.id,"
                " shown: document.querySelectorAll('section.source:not([hidden])').length,"
                " svgs: s ? Array.from(s.querySelectorAll('.plot svg')).map(v => v.getBoundingClientRect().width) : [],"
                " paths: s ? s.querySelectorAll('.plot svg path').length : 0, title: document.title}; })()"
            )
            assert state["index"] is True and state["shown"] == 1
            assert len(state["svgs"]) == 2 and min(state["svgs"]) > 600, state
            assert state["paths"] > 20 and "alice.mp4" in state["title"]
            png = b.screenshot()
            b.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 1400, "deviceScaleFactor": 1, "mobile": False})
            b.eval("location.hash = '#index'")
            time.sleep(0.2)
            assert b.eval("document.getElementById('index').hidden") is False
            time.sleep(0.2)
            events = list(b.events)
        finally:
            b.close()
    Image.fromarray(png).save(tmp_path / "source_view.png")

    # no script error, no console error, no CSP violation
    errors = [m for m in events if m.get("method") == "Runtime.exceptionThrown"]
    errors += [m for m in events if m.get("method") == "Runtime.consoleAPICalled" and m["params"]["type"] in ("error", "assert")]
    errors += [m for m in events if m.get("method") == "Log.entryAdded" and m["params"]["entry"]["level"] == "error"]
    assert not errors, errors
    # no network: the only request is the report file itself (data: URIs are not fetched)
    urls = {m["params"]["request"]["url"] for m in events if m.get("method") == "Network.requestWillBeSent"}
    assert urls <= {url} | {u for u in urls if u.startswith("data:")}, urls

    # the screenshot has the plots: non-trivial content and the emotion colours of face A's lines
    assert png.shape[0] >= 1000 and png.std() > 30
    px = png.reshape(-1, 3).astype(np.int16)
    for emo in ("happy", "sad", "neutral"):
        near = (np.abs(px - _hex_rgb(EMOTION_COLORS[emo])).max(axis=1) < 30).sum()
        assert near > 500, (emo, near)


# ----------------------------------------------------------------------------- untrusted Parquet

# Each payload tries another way out of the place it is written into (text, attribute value,
# script element); every injected element carries ``data-pwn`` and every injected script sets
# ``window.__pwn``, so the DOM check below finds any that got through.
PAYLOADS = [
    "<script data-pwn>window.__pwn=1</script>",
    "</script><script data-pwn>window.__pwn=2</script>",
    "<img data-pwn src=x onerror=\"window.__pwn=3\">",
    "\"><img data-pwn src=x onerror=window.__pwn=4>",
    "'><svg data-pwn onload=window.__pwn=5>",
    "</style><style data-pwn>body{display:none}</style>",
    "</textarea></title><b data-pwn>x</b>",
]


def write_tampered_session(directory: Path) -> Path:
    """A session whose status, path, error, kind, emotion and metadata fields carry HTML and
    script (what a crafted Parquet from someone else could hold)."""
    out = write_session(directory)
    faces = pq.read_table(out)
    n = faces.num_rows
    src_paths = [f"/data/{PAYLOADS[i % len(PAYLOADS)]}/clip{i % 2}.mp4" for i in range(n)]
    faces = faces.set_column(faces.schema.get_field_index("source_path"), "source_path", pa.array(src_paths, pa.string()))
    faces = faces.set_column(faces.schema.get_field_index("emotion"), "emotion", pa.array([PAYLOADS[0]] * n, pa.string()))
    meta = dict(faces.schema.metadata or {})
    meta[b"fer_batch.version"] = PAYLOADS[1].encode()
    meta[b"fer_batch.models"] = json.dumps({PAYLOADS[2]: {"name": PAYLOADS[3]}, "classify": PAYLOADS[4]}).encode()
    pq.write_table(faces.replace_schema_metadata(meta), out)
    statuses = ["ok", "partial", "failed", "skipped", *PAYLOADS]
    rows = []
    for i, st in enumerate(statuses):
        p = PAYLOADS[i % len(PAYLOADS)]
        rows.append(dict(
            source_id=("s1", "s2")[i] if i < 2 else f"{p}-{i}", path=f"/in/{p}/{p}.mp4", kind=p, status=st,
            error=p, duration_s=10.0, frames_sampled=1, faces=0, tracks=0, wall_s=0.1,
        ))  # fmt: skip
    pq.write_table(rows_to_table(rows, SOURCES_SCHEMA), companion_path_of(out))
    return out


def companion_path_of(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".parquet") + ".sources.parquet")


def test_tampered_parquet_values_are_escaped_and_statuses_checked(tmp_path: Path):
    out = write_tampered_session(tmp_path)
    figs = summarize(out)
    assert {s.status for s in figs.sources} == {"ok", "partial", "failed", "skipped", "invalid"}
    bad = [s for s in figs.sources if s.status == "invalid"]
    assert len(bad) == len(PAYLOADS) and all("unrecognised status" in s.error for s in bad)
    html_out = tmp_path / "review.html"
    build_report(out, html_out, thumbnails=True)
    text = html_out.read_text()
    for tag in ("script", "img", "svg", "style", "b"):
        assert f"<{tag} data-pwn" not in text
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text).group(1)
    assert "unsafe-inline" not in csp and "'sha256-" in csp
    assert "style=" not in text  # sizes and colours are attributes and classes (styles need no unsafe-inline)
    # the status filter offers only known statuses
    opts = re.findall(r'<option value="([^"]*)"', text)
    assert opts == ["", "ok", "partial", "failed", "skipped", "invalid"]


def test_wrong_column_types_are_refused(tmp_path: Path):
    out = write_session(tmp_path)
    faces = pq.read_table(out)
    i = faces.schema.get_field_index("track_id")
    faces = faces.set_column(i, "track_id", pa.array([PAYLOADS[0]] * faces.num_rows, pa.string()))
    pq.write_table(faces, out)
    with pytest.raises(DataError, match="track_id"):
        load_report(out)
    write_session(tmp_path)
    meta = dict(pq.read_schema(out).metadata)
    meta[b"fer_batch.models"] = b"{not json"
    pq.write_table(pq.read_table(out).replace_schema_metadata(meta), out)
    with pytest.raises(DataError, match="metadata"):
        load_report(out)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_tampered_parquet_injects_nothing_in_chromium(tmp_path: Path):
    out = write_tampered_session(tmp_path)
    html_out = tmp_path / "review.html"
    build_report(out, html_out, thumbnails=True, per_page=5)
    url = html_out.resolve().as_uri()
    probe = """(() => {
      const sections = Array.from(document.querySelectorAll('section.source'));
      const info = {
        pwn: typeof window.__pwn === 'undefined' ? null : window.__pwn,
        marked: document.querySelectorAll('[data-pwn]').length,
        handlers: Array.from(document.querySelectorAll('*')).filter(el =>
          Array.from(el.attributes).some(a => a.name.startsWith('on'))).length,
        scripts: document.scripts.length,
        styles: document.querySelectorAll('style').length,
        imgs: document.querySelectorAll('img').length,
        ready: document.documentElement.getAttribute('data-ready'),
        bodyShown: getComputedStyle(document.body).display !== 'none',
        options: Array.from(document.querySelectorAll('#status-filter option')).map(o => o.value),
        sections: sections.length,
        text: document.body.textContent,
        titles: sections.map(s => s.getAttribute('data-title')),
      };
      return info; })()"""
    with tempfile.TemporaryDirectory() as ud:
        b = Chromium(Path(ud))
        try:
            b.open_page()
            b.send("Page.navigate", {"url": url})
            b.wait_event("Page.loadEventFired")
            index = b.eval(probe)
            views = []
            for k in range(index["sections"]):  # open every source view, too
                b.eval(f"location.hash = '#' + document.querySelectorAll('section.source')[{k}].id")
                b.eval("new Promise(r => setTimeout(r, 50))")
                views.append(b.eval(probe))
            events = list(b.events)
        finally:
            b.close()
    for state in [index, *views]:
        assert state["pwn"] is None and state["marked"] == 0 and state["handlers"] == 0, state
        assert state["scripts"] == 2 and state["styles"] == 1 and state["imgs"] == 0, state
        assert state["ready"] == "1" and state["bodyShown"]
    assert index["options"] == ["", "ok", "partial", "failed", "skipped", "invalid"]
    # the payloads are shown as text, verbatim
    for p in PAYLOADS:
        assert p in index["text"], p
    assert any("unrecognised status" in v["text"] for v in views)
    # the page's own script and stylesheet pass the CSP (by hash): no violation, no error
    errors = [m for m in events if m.get("method") == "Runtime.exceptionThrown"]
    errors += [m for m in events if m.get("method") == "Log.entryAdded" and m["params"]["entry"]["level"] == "error"]
    errors += [m for m in events if m.get("method") == "Runtime.consoleAPICalled" and m["params"]["type"] == "error"]
    assert not errors, errors


# ----------------------------------------------------------------------------- real pipeline output


def test_report_on_real_process_output(tmp_path: Path):
    """`fer-batch process` on a generated video, then the report (with thumbnails) on its output."""
    from fer_batch.api import run
    from fer_batch.synth import make_sample_video

    video = make_sample_video(tmp_path / "group.mp4", seconds=4, fps=25, size=(640, 360))
    out = tmp_path / "report.parquet"
    res = run([video.path], out=out, fps=2.0)
    assert res.exit_code == 0
    faces = pq.read_table(out)
    assert faces.num_rows > 0
    html_out = tmp_path / "review.html"
    # thresholds at 0 so every face gets its strongest-surprise moment (and a thumbnail)
    params = MomentParams(peak_threshold=0.0, surprise_threshold=0.0, sustain_threshold=1.0)
    figs = build_report(out, html_out, thumbnails=True, params=params)
    (sf,) = figs.sources
    assert sf.status == "ok" and sf.path == str(video.path)
    n_tracks = len(set(faces.column("track_id").to_pylist()))
    assert sf.faces == n_tracks >= 6
    assert sf.rows == faces.num_rows
    # shares over the real probabilities: sum to 1, and match the argmax of the written rows
    df = faces.to_pandas()
    counts = df[list(PROB_COLUMNS)].to_numpy().argmax(1)
    for j, emo in enumerate(EMOTIONS):
        assert sf.shares[emo] == pytest.approx((counts == j).mean())
    text = html_out.read_text()
    n_plots = min(n_tracks, 12)
    assert text.count('<div class="plot"><svg') == n_plots
    thumbs = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', text)
    assert len(thumbs) == sum(1 for m in sf.moments if m.box is not None) >= n_tracks
    for b64 in thumbs[:3]:
        assert max(Image.open(io.BytesIO(base64.b64decode(b64))).size) <= 96


def test_images_only_and_empty_reports(tmp_path: Path):
    """Single images (no time axis) and a run where nothing had faces both give a report."""
    rng = np.random.default_rng(2)
    tabs = []
    for i in range(2):
        p = np.stack([_probs("angry", 0.7, rng), _probs("happy", 0.6, rng)]).astype(np.float32)
        d = FaceDetections(np.zeros(2, np.int64), np.zeros(2), np.array([[10, 10, 50, 60], [70, 10, 110, 60]]),
                           np.full(2, 0.9), np.zeros((2, 5, 2)), np.arange(2), p)  # fmt: skip
        tabs.append(faces_to_table(f"img{i}", f"/photos/p{i}.jpg", d))
    imgs = tmp_path / "images.parquet"
    pq.write_table(pa.concat_tables(tabs), imgs)
    figs = build_report(imgs, tmp_path / "images.html")
    # no time axis: face time 0, no changes/min; shares count faces (2 of 4 angry)
    assert figs.face_time_s == 0 and figs.changes_per_min is None
    assert figs.shares["angry"] == pytest.approx(0.5) and figs.shares["happy"] == pytest.approx(0.5)
    # each angry face (0.7 >= 0.6) is a peak; no plots for single frames, the probabilities instead
    assert [m.kind for s in figs.sources for m in s.moments] == ["peak", "peak"]
    text = (tmp_path / "images.html").read_text()
    assert '<div class="plot">' not in text and text.count("· probabilities") == 4

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=faces_to_table("x", "x", FaceDetections.empty()).schema), empty)
    rows = [dict(source_id="x", path="/v/x.mp4", kind="video", status="failed", error="boom", frames_sampled=0, faces=0,
                 tracks=0, wall_s=0.0)]  # fmt: skip
    pq.write_table(rows_to_table(rows, SOURCES_SCHEMA), tmp_path / "empty.sources.parquet")
    figs = build_report(empty, tmp_path / "empty.html")
    assert figs.rows == 0 and figs.sources[0].status == "failed"
    assert figs.summary()["share_positive"] is None  # undefined without faces, not 0
    assert "not processed (failed)" in (tmp_path / "empty.html").read_text()


def test_report_on_partitioned_dataset(session: Path, tmp_path: Path):
    """A dataset folder of ``--incremental`` runs (hive partitions; ``_``/``.`` names skipped)."""
    faces = pq.read_table(session)
    root = tmp_path / "dataset"
    for day, sid in (("2026-01-01", "s1"), ("2026-01-02", "s2")):
        part = root / f"date={day}"
        part.mkdir(parents=True)
        pq.write_table(faces.filter(pa.compute.equal(faces["source_id"], sid)), part / f"part-x-{sid}.parquet")
    (root / "_state").mkdir()
    (root / "_state" / "state.json").write_text("{}")
    (root / "date=2026-01-02" / ".part-tmp.parquet.tmp").write_bytes(b"partial")
    figs = build_report(root, tmp_path / "d.html")
    assert sorted(s.source_id for s in figs.sources) == ["s1", "s2"]
    assert figs.rows == faces.num_rows
    assert figs.face_time_s == pytest.approx(140.0)
