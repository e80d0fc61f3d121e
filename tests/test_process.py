"""End-to-end tests of the main job on small real media (generated from insightface's t1.jpg).

Real decoding, the shipped ONNX detector through InsightFace, the real tracker and classifier,
Parquet read back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

import fer_batch
from fer_batch import synth
from fer_batch.api import run
from fer_batch.schema import FACES_SCHEMA, PROB_COLUMNS, SMOOTH_COLUMNS, SOURCES_SCHEMA, TRACKS_SCHEMA, read_metadata


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fer_batch.cli", *args], capture_output=True, text=True, timeout=600)


def _sorted(table):
    return table.sort_by([("source_path", "ascending"), ("frame_index", "ascending"), ("x1", "ascending")])


@pytest.fixture(scope="module")
def video_run(sample_video, tmp_path_factory):
    out = tmp_path_factory.mktemp("proc") / "report.parquet"
    res = run([sample_video.path], out=out, device="cpu")
    return sample_video, out, res


def test_video_rows_schema_and_metadata(video_run):
    vid, out, res = video_run
    faces = pq.read_table(out)
    assert faces.schema.remove_metadata() == FACES_SCHEMA
    meta = read_metadata(faces.schema)
    assert meta["schema_version"] == "1.0"
    assert meta["version"] == fer_batch.__version__
    assert len(meta["models"]["detector"]["sha256"]) == 64 and len(meta["models"]["classifier"]["sha256"]) == 64
    assert meta["config"]["sampling"]["fps"] == 2.0
    # 4 s at 2 fps -> 8 sampled frames, the 6 faces in each
    srcs = pq.read_table(str(out).replace(".parquet", ".sources.parquet"))
    assert srcs.schema.remove_metadata() == SOURCES_SCHEMA
    row = srcs.to_pylist()[0]
    assert row["status"] == "ok" and row["frames_sampled"] == 8
    assert row["duration_s"] == pytest.approx(4.0, abs=0.1)
    per_frame = faces.group_by("frame_index").aggregate([("track_id", "count")]).column("track_id_count").to_pylist()
    assert per_frame == [6] * 8, per_frame
    ts = np.unique(faces.column("timestamp_s").to_numpy())
    np.testing.assert_allclose(np.diff(ts), 0.5, atol=0.05)
    # frame index and timestamp agree at 25 fps
    np.testing.assert_allclose(faces.column("frame_index").to_numpy() / 25.0, faces.column("timestamp_s").to_numpy(), atol=1e-3)


def test_probabilities_and_labels(video_run):
    _, out, _ = video_run
    df = pq.read_table(out).to_pandas()
    p = df[list(PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-4)
    assert (p >= 0).all()
    best = np.array([c[2:] for c in PROB_COLUMNS])[p.argmax(axis=1)]
    assert (df["emotion"].to_numpy() == best).all()
    np.testing.assert_allclose(df["emotion_score"].to_numpy(), p.max(axis=1), atol=1e-6)
    assert df[list(SMOOTH_COLUMNS)].isna().all().all()  # smoothing is off by default


def test_tracks_are_stable_and_boxes_match_truth(video_run):
    vid, out, _ = video_run
    df = pq.read_table(out).to_pandas()
    assert df["track_id"].nunique() == 6
    for tid, g in df.groupby("track_id"):
        assert len(g) == 8, f"track {tid} covers {len(g)} of 8 frames"
        assert g["frame_index"].is_unique
    # each detection lies on a true face of that frame; the same true face keeps the same id
    owner = {}
    for r in df.itertuples():
        gt = vid.boxes[r.frame_index]
        cx, cy = (r.x1 + r.x2) / 2, (r.y1 + r.y2) / 2
        inside = [k for k, b in enumerate(gt) if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]]
        assert len(inside) == 1, (r.frame_index, cx, cy)
        owner.setdefault(r.track_id, inside[0])
        assert owner[r.track_id] == inside[0]
        lm = np.asarray(r.landmarks).reshape(5, 2)
        assert (lm[:, 0] >= r.x1 - 5).all() and (lm[:, 0] <= r.x2 + 5).all()
    tracks = pq.read_table(str(out).replace(".parquet", ".tracks.parquet"))
    assert tracks.schema.remove_metadata() == TRACKS_SCHEMA
    assert sorted(tracks.column("frames").to_pylist()) == [8] * 6


def test_cli_equals_api(video_run, tmp_path):
    vid, out_api, _ = video_run
    out = tmp_path / "cli.parquet"
    r = _cli("process", str(vid.path), "--out", str(out), "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    a, b = _sorted(pq.read_table(out_api)), _sorted(pq.read_table(out))
    assert a.num_rows == b.num_rows
    for col in ("frame_index", "track_id", "emotion"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist()
    np.testing.assert_allclose(a.column("x1").to_numpy(), b.column("x1").to_numpy(), atol=1e-3)
    np.testing.assert_allclose(a.column("p_happy").to_numpy(), b.column("p_happy").to_numpy(), atol=1e-5)


def test_images_each_its_own_source(image_folder, tmp_path):
    folder = image_folder[0].path.parent
    res = run([folder], out=tmp_path / "imgs.parquet", device="cpu")
    src = res.sources.to_pandas()
    assert (src["status"] == "ok").all(), src[["path", "status", "error"]]
    assert set(src["kind"]) == {"image"}
    faces = res.faces.to_pandas()
    assert (faces["frame_index"] == 0).all() and (faces["timestamp_s"] == 0).all()
    assert set(faces["source_path"]) <= set(src["path"])
    by_path = faces.groupby("source_path").size().to_dict()
    for img in image_folder:
        if img.faces >= 1:
            assert by_path.get(str(img.path), 0) >= 1, f"no face found in {img.path.name} ({img.note})"


def test_images_as_sequence_tracks(tmp_path):
    d = tmp_path / "seq"
    d.mkdir()
    vid = synth.make_sample_video(tmp_path / "v.mp4", seconds=2, fps=5, size=(480, 270))
    cap = cv2.VideoCapture(str(vid.path))
    i = 0
    while True:
        ok, fr = cap.read()
        if not ok:
            break
        cv2.imwrite(str(d / f"frame_{i}.png"), fr)  # natural order: frame_2 before frame_10
        i += 1
    res = run([d], out=tmp_path / "seq.parquet", images_as="sequence", image_fps=5, fps=None, every=1, device="cpu")
    src = res.sources.to_pylist()
    assert len(src) == 1 and src[0]["kind"] == "image_sequence" and src[0]["frames_sampled"] == i
    faces = res.faces.to_pandas()
    assert faces["track_id"].nunique() == 6
    np.testing.assert_allclose(sorted(faces["timestamp_s"].unique()), np.arange(i) / 5.0, atol=1e-6)


def test_bad_inputs_recorded_and_run_goes_on(mixed_folder, bad_files, tmp_path):
    out = tmp_path / "mixed.parquet"
    r = _cli("process", str(mixed_folder), str(bad_files["missing"]), "--out", str(out), "--device", "cpu", "--quiet")
    assert r.returncode == 1, r.stderr  # some inputs failed
    rows = pq.read_table(str(out).replace(".parquet", ".sources.parquet")).to_pylist()
    src = {Path(x["path"]).name: (x["status"], x["error"]) for x in rows}
    assert src["good.mp4"][0] == "ok"
    assert src["notes.txt"][0] == "skipped"
    for name in ("empty.mp4", "random_bytes.mp4", "truncated.mp4", "not_an_image.jpg", "bomb.png", "does_not_exist.mp4"):
        status, err = src[name]
        assert status == "failed", (name, status, err)
        assert err and len(err) > 10, (name, err)
    assert src["corrupt_middle.mp4"][0] == "partial", src["corrupt_middle.mp4"]
    faces = pq.read_table(out).to_pandas()
    good = faces[faces["source_path"].str.endswith("good.mp4")]
    assert good["track_id"].nunique() == 6 and len(good) == 48
    corrupt = faces[faces["source_path"].str.endswith("corrupt_middle.mp4")]
    assert len(corrupt) > 0  # rows before the damage are kept
    photos = faces[faces["source_path"].str.contains("/photos/")]
    assert len(photos) > 0


def test_usage_errors_exit_2(sample_video, tmp_path):
    r = _cli("process", str(sample_video.path), "--out", str(tmp_path / "x.parquet"), "--det-size", "100")
    assert r.returncode == 2 and "multiples of 32" in r.stderr
    r = _cli("process", str(sample_video.path), "--out", str(tmp_path / "x.csv"))
    assert r.returncode == 2 and ".parquet" in r.stderr
    r = _cli("process", str(sample_video.path), "--out", str(tmp_path / "x.parquet"), "--model", "no_such_model")
    assert r.returncode == 2 and "known models" in r.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_no_faces_video_gives_no_rows(tmp_path):
    path = tmp_path / "empty_scene.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 180))
    bg = synth.background((320, 180), 3)
    for _ in range(20):
        w.write(bg)
    w.release()
    res = run([path], out=tmp_path / "nf.parquet", device="cpu")
    assert res.faces.num_rows == 0
    row = res.sources.to_pylist()[0]
    assert row["status"] == "ok" and row["frames_sampled"] == 4 and row["tracks"] == 0
    assert res.exit_code == 0


def test_single_person_one_track(tmp_path):
    """One face, moving, present throughout: one track over every sampled frame."""
    t1 = synth.load_t1()
    from fer_batch.detect import FaceDetector
    from fer_batch.config import DetectConfig
    from fer_batch.types import Frame

    det = FaceDetector(DetectConfig())
    det.setup()
    d = det(Frame(0, 0.0, t1))
    x1, y1, x2, y2 = d.xyxy[int(np.argmax(d.det_score))].astype(int)
    pad = int(0.6 * (x2 - x1))
    face = t1[max(0, y1 - pad): y2 + pad, max(0, x1 - pad): x2 + pad]
    path = tmp_path / "one.mp4"
    W, H = 480, 270
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (W, H))
    bg = synth.background((W, H), 1)
    fh, fw = face.shape[:2]
    for i in range(125):  # 5 s
        fr = bg.copy()
        x = int(20 + (W - fw - 40) * i / 124)
        y = (H - fh) // 2
        fr[y:y + fh, x:x + fw] = face
        w.write(fr)
    w.release()
    res = run([path], out=tmp_path / "one.parquet", device="cpu", smooth=1.0)
    faces = res.faces.to_pandas()
    assert faces["track_id"].nunique() == 1
    assert len(faces) == res.sources.to_pylist()[0]["frames_sampled"] == 10
    assert faces[list(SMOOTH_COLUMNS)].notna().all().all()
    np.testing.assert_allclose(faces[list(SMOOTH_COLUMNS)].sum(axis=1), 1.0, atol=1e-4)


def test_api_process_returns_table(sample_video):
    table = fer_batch.process([sample_video.path], max_frames=2, device="cpu")
    assert table.num_rows == 12
    assert len(set(table.column("track_id").to_pylist())) == 6
