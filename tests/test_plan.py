"""The plan of a run without Ray: splitting, stitching, smoothing across borders, merging,
which sources may be split, and the local runner on segments (real media, real models).
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pyarrow as pa
import pytest

from fer_batch import plan
from fer_batch.config import RunConfig, config_from_options
from fer_batch.pipeline import Stages, process_source, smooth_probs
from fer_batch.runners.local import LocalRunner
from fer_batch.schema import PROB_COLUMNS, SMOOTH_COLUMNS, TrackSummary, faces_to_table, tracks_table
from fer_batch.types import FaceDetections, MediaSource


# ----------------------------------------------------------------------------- pure parts


def test_split_times_partitions_frames_and_overlaps():
    ts = np.arange(0, 6, 0.25)  # 4 fps, 6 s
    pieces = plan.split_times(ts, segment_s=2.0, overlap_frames=4, overlap_s=0.5)
    assert len(pieces) == 3
    owned = []
    for (own, read) in pieces:
        m = (ts >= own[0] - 1e-4) & (ts < own[1] - 1e-4)
        owned.append(np.flatnonzero(m))
        assert read[1] == own[1] and read[0] <= own[0]
    # every planned frame owned exactly once, in order
    assert np.array_equal(np.concatenate(owned), np.arange(len(ts)))
    # later segments re-read 4 sampled frames (1 s at 4 fps) before their start
    assert pieces[1][1][0] == pytest.approx(1.0) and pieces[2][1][0] == pytest.approx(3.0)
    # lost_s longer than 4 frames widens the overlap
    wide = plan.split_times(ts, 2.0, 4, overlap_s=1.5)
    assert wide[2][1][0] == pytest.approx(2.5)
    # short sources, a short remainder, no frames: one unit
    assert len(plan.split_times(ts, 10.0)) == 1
    assert len(plan.split_times(np.arange(0, 2.3, 0.25), 2.0)) == 1
    assert plan.split_times(np.zeros(0), 2.0) == [((-math.inf, math.inf), (-math.inf, math.inf))]


def _faces(frames, boxes, ids, probs=None, t_per_frame=0.25, source="s"):
    """A FACES_SCHEMA table of synthetic faces."""
    n = len(frames)
    rng = np.random.default_rng(0)
    probs = probs if probs is not None else rng.dirichlet(np.ones(7), n).astype(np.float32)
    d = FaceDetections(
        frame_index=np.asarray(frames, np.int64), timestamp_s=np.asarray(frames) * t_per_frame,
        xyxy=np.asarray(boxes, np.float32), det_score=np.full(n, 0.9, np.float32),
        kps=np.zeros((n, 5, 2), np.float32), track_id=np.asarray(ids, np.int64), probs=probs,
    )  # fmt: skip
    return faces_to_table(source, f"/{source}.mp4", d)


def _world(n_frames=24):
    """Ground truth: 3 faces; face 2 leaves at frame 9 and a new face 3 appears at frame 14."""
    frames, boxes, ids = [], [], []
    for f in range(n_frames):
        for k, (x, y) in enumerate([(10, 10), (200, 50), (400, 300), (100, 300)]):
            alive = (k < 2) or (k == 2 and f < 9) or (k == 3 and f >= 14)
            if alive:
                frames.append(f)
                boxes.append([x + 3 * f, y, x + 3 * f + 60, y + 70])
                ids.append(k)
    return np.array(frames), np.array(boxes, np.float32), np.array(ids)


def _segment_view(frames, boxes, ids, read, rng):
    """What a segment's own fresh tracker would output: rows in ``read``, ids renumbered."""
    t = frames * 0.25
    m = (t >= read[0] - 1e-4) & (t < read[1] - 1e-4)
    f, b, g = frames[m], boxes[m], ids[m]
    order = list(dict.fromkeys(g.tolist()))
    perm = rng.permutation(len(order))  # arbitrary local numbering
    local = np.array([perm[order.index(x)] for x in g])
    return f, b, local


def test_stitcher_keeps_each_row_once_and_ids_across_borders():
    frames, boxes, ids = _world()
    table = _faces(frames, boxes, ids)
    probs = np.stack([table.column(c).to_numpy() for c in PROB_COLUMNS], axis=1)
    ts = np.arange(24) * 0.25
    pieces = plan.split_times(ts, 2.0, overlap_frames=4, overlap_s=0.0)
    assert len(pieces) == 3
    rng = np.random.default_rng(1)
    st = plan.Stitcher()
    out = []
    for k, (own, read) in enumerate(pieces):
        f, b, local = _segment_view(frames, boxes, ids, read, rng)
        sel = np.isin(np.arange(len(frames)), np.flatnonzero((frames * 0.25 >= read[0] - 1e-4) & (frames * 0.25 < read[1] - 1e-4)))
        seg = _faces(f, b, local, probs=probs[sel])
        keep_from = pieces[k + 1][1][0] if k + 1 < len(pieces) else None
        out.append(st.add(seg, own, keep_from=keep_from))
    got = pa.concat_tables(out)
    assert got.num_rows == table.num_rows  # nothing lost, nothing twice
    key = lambda tb: sorted(zip(tb.column("frame_index").to_pylist(), tb.column("x1").to_pylist()))  # noqa: E731
    assert key(got) == key(table)
    # ids equal the truth up to renumbering: a bijection
    pairs = set(zip(got.sort_by([("frame_index", "ascending"), ("x1", "ascending")]).column("track_id").to_pylist(),
                    table.sort_by([("frame_index", "ascending"), ("x1", "ascending")]).column("track_id").to_pylist()))
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4 and len({b for _, b in pairs}) == 4
    # ids are dense and in order of first appearance
    assert sorted({a for a, _ in pairs}) == [0, 1, 2, 3]


def test_window_smoother_equals_whole_source_smoothing():
    frames, boxes, ids = _world()
    table = _faces(frames, boxes, ids).sort_by([("frame_index", "ascending"), ("x1", "ascending")])
    t = table.column("timestamp_s").to_numpy()
    probs = np.stack([table.column(c).to_numpy() for c in PROB_COLUMNS], axis=1)
    want = smooth_probs(table.column("track_id").to_numpy(), t, probs, 1.5)
    sm = plan.WindowSmoother(1.5)
    out = []
    edges = [-math.inf, 1.0, 2.0, 4.5, math.inf]
    for a, b in zip(edges[:-1], edges[1:]):
        seg = table.filter(pa.array((t >= a) & (t < b)))
        out += sm.push((a, b), seg)
    out += sm.finish()
    got = pa.concat_tables(out)
    assert got.num_rows == table.num_rows
    got_sm = np.stack([got.column(c).to_numpy() for c in SMOOTH_COLUMNS], axis=1)
    np.testing.assert_allclose(got_sm, want, atol=1e-5)


def test_track_summary_in_chunks_equals_whole_table():
    """A split source's tracks are summarised segment by segment: same table as all at once."""
    frames, boxes, ids = _world()
    table = _faces(frames, boxes, ids)
    acc = TrackSummary()
    for lo in range(0, table.num_rows, 7):
        acc.add(table.slice(lo, 7))
    got, want = acc.table(), tracks_table(table)
    assert got.column_names == want.column_names
    for c in got.column_names:
        if c.startswith("mean_"):
            np.testing.assert_allclose(got.column(c).to_numpy(), want.column(c).to_numpy(), atol=1e-6)
        else:
            assert got.column(c).to_pylist() == want.column(c).to_pylist(), c


# ----------------------------------------------------------------------------- which sources split


def test_sources_that_cannot_seek_cheaply_are_never_split(sample_video, tmp_path):
    """An index-less or untrusted container (.ts, .mpg, .wmv, .flv) would make every segment
    decode from the start: such a source is one unit whatever --segment-seconds says."""
    cfg = config_from_options(segment_seconds=1.0, fps=2.0)
    mp4 = MediaSource(sample_video.path, "video", "v1")
    assert len(plan.plan_source(mp4, cfg)) == 4  # 4 s in 1 s segments
    for ext in (".ts", ".mpg", ".wmv", ".flv"):
        p = tmp_path / f"same_stream{ext}"
        shutil.copy(sample_video.path, p)
        units = plan.plan_source(MediaSource(p, "video", "v2"), cfg)
        assert [(u.index, u.count, u.own, u.read) for u in units] == [(0, 1, None, None)], ext
    # images are never split; no --segment-seconds locally: no split
    assert len(plan.plan_source(mp4, RunConfig())) == 1


# ----------------------------------------------------------------------------- local runner


@pytest.fixture(scope="module")
def local_runner():
    cfg = config_from_options(fps=2.0, lost_s=1.0, threads=1, device="cpu", smooth=1.0, segment_seconds=2.0)
    with LocalRunner(cfg, "cpu") as r:
        yield r


def test_local_runner_splits_and_the_merge_keeps_every_row_once(sample_video, local_runner):
    """--segment-seconds works without Ray: same rows as the whole source, ids stitched. The
    segments run in the runner's worker process, the whole source in this process."""
    cfg = local_runner.cfg
    src = MediaSource(sample_video.path, "video", "v1")
    stages = Stages(cfg, "cpu").setup()
    try:
        whole = process_source(src, stages, cfg)
    finally:
        stages.teardown()
    p = plan.Plan([src], cfg)
    asm = plan.Assembler(p)
    results = list(local_runner.run(p.units()))
    assert [(r.unit.index, r.unit.count) for r in results] == [(0, 2), (1, 2)]
    for r in reversed(results):  # any completion order
        asm.add(r)
    (got_src, got_results), = list(asm.ready())
    emitted = []
    row, tracks = plan.merge_source(got_src, got_results, cfg, emitted.append)
    faces = pa.concat_tables(emitted)
    assert row.status == "ok" and row.frames_sampled == whole.row.frames_sampled == 8
    assert faces.num_rows == whole.faces.num_rows == row.faces
    key = ["frame_index", "x1", "y1"]
    a, b = faces.sort_by([(k, "ascending") for k in key]), whole.faces.sort_by([(k, "ascending") for k in key])
    np.testing.assert_allclose(a.column("p_happy").to_numpy(), b.column("p_happy").to_numpy(), atol=1e-5)
    # smoothing recomputed across the border: equals smoothing over the whole source
    np.testing.assert_allclose(a.column("p_happy_smoothed").to_numpy(), b.column("p_happy_smoothed").to_numpy(), atol=1e-5)
    pairs = set(zip(a.column("track_id").to_pylist(), b.column("track_id").to_pylist()))
    assert len(pairs) == 6 == tracks.num_rows  # the 6 faces keep one id each across the border


class _FailingClassifier:
    """The real classifier, except that classifying raises (an ONNX Runtime failure, say)."""

    def __init__(self, real):
        self.real = real

    def crops(self, image, kps):
        return self.real.crops(image, kps)

    def __call__(self, crops):
        raise RuntimeError("ORT: simulated failure in the classifier")


def test_error_in_the_last_classifier_batch_fails_that_source_only(sample_video, image_folder):
    """With a batch size larger than a source's faces, the only batch is the last one: its
    error must become the source's row, never escape and stop the run."""
    cfg = config_from_options(fps=2.0, threads=1, device="cpu", batch_size=10_000)
    stages = Stages(cfg, "cpu").setup()
    real = stages.classifier
    stages.classifier = _FailingClassifier(real)
    try:
        res = process_source(MediaSource(sample_video.path, "video", "v1"), stages, cfg)
        assert res.row.status in ("partial", "failed") and "simulated failure" in res.row.error
        assert res.faces.num_rows == 0 and res.row.frames_sampled == 8
    finally:
        stages.classifier = real
    # the next source runs normally with the same stages
    ok = process_source(MediaSource(image_folder[0].path, "image", "i1"), stages, cfg)
    assert ok.row.status == "ok" and ok.faces.num_rows == image_folder[0].faces
    stages.teardown()
