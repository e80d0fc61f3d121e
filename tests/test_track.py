"""FaceTracker on synthetic face paths (no detector, no /work/shared): fast and exact."""

from __future__ import annotations

import numpy as np
import pytest

from fer_batch.config import TrackConfig
from fer_batch.errors import ConfigError, DataError
from fer_batch.track import FaceTracker, iou_matrix, track_config
from fer_batch.types import FaceDetections

FPS = 2.0  # the pipeline's default sampling rate


def dets_from_boxes(boxes, t: float = 0.0, frame_index: int = 0) -> FaceDetections:
    """FaceDetections for one frame from (N, 4) xyxy boxes, with plausible landmarks."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    w = (boxes[:, 2] - boxes[:, 0])[:, None]
    offs = np.array([[-0.2, -0.1], [0.2, -0.1], [0, 0.05], [-0.15, 0.2], [0.15, 0.2]], np.float32)
    kps = c[:, None, :] + offs[None] * w[:, :, None]
    return FaceDetections(
        frame_index=np.full(n, frame_index, np.int64),
        timestamp_s=np.full(n, t),
        xyxy=boxes,
        det_score=np.full(n, 0.9, np.float32),
        kps=kps,
    )


def box_at(cx: float, cy: float, size: float = 80.0) -> list[float]:
    return [cx - size / 2, cy - size * 0.6, cx + size / 2, cy + size * 0.6]


def run(tracker: FaceTracker, frames, embeddings=None):
    """frames: list of (t, [(gt_id, box), ...]). Returns list of dicts gt_id -> track_id."""
    out = []
    for k, (t, faces) in enumerate(frames):
        gts = [g for g, _ in faces]
        boxes = [b for _, b in faces]
        d = dets_from_boxes(boxes, t, k)
        emb = None
        if embeddings is not None:
            emb = np.stack([embeddings(g, k) for g in gts]) if faces else np.zeros((0, 8))
        res = tracker.update(d, t, embeddings=emb)
        assert len(res) == len(d)
        np.testing.assert_array_equal(res.xyxy, d.xyxy)  # same rows, same order
        assert (res.track_id >= 0).all()
        assert len(set(res.track_id.tolist())) == len(res)  # unique within the frame
        out.append(dict(zip(gts, res.track_id.tolist())))
    return out


def ids_per_gt(assignments) -> dict:
    ids: dict = {}
    for frame in assignments:
        for g, tid in frame.items():
            ids.setdefault(g, []).append(tid)
    return ids


def test_stable_ids_for_moving_faces_at_2fps():
    rng = np.random.default_rng(0)
    frames = []
    for k in range(60):  # 30 s
        t = k / FPS
        faces = [
            (0, box_at(150 + 60 * t, 200 + 5 * rng.normal())),  # walks right, 0.75 face widths/s
            (1, box_at(900 - 40 * t, 500 + 80 * np.sin(t))),  # left, bobbing
            (2, box_at(600 + 150 * np.sin(0.4 * t), 150 + 4 * rng.normal(), 60)),  # swings
            (3, box_at(400 + 3 * rng.normal(), 650 + 3 * rng.normal(), 120)),  # sits still
        ]
        frames.append((t, faces))
    ids = ids_per_gt(run(FaceTracker(TrackConfig()), frames))
    for g, tids in ids.items():
        assert len(set(tids)) == 1, f"face {g} got ids {sorted(set(tids))}"
    assert len({tids[0] for tids in ids.values()}) == 4


def test_fast_face_moving_more_than_its_width_per_sample():
    frames = [(k / FPS, [(0, box_at(100 + 200 * k / FPS, 300))]) for k in range(20)]  # 1.25 widths/sample
    ids = ids_per_gt(run(FaceTracker(), frames))
    assert set(ids[0]) == {ids[0][0]}


def test_crossing_faces_keep_their_ids():
    frames = []
    for k in range(40):  # 20 s, they meet at t = 10 s
        t = k / FPS
        a = box_at(100 + 60 * t, 300 + 3 * t)
        b = box_at(1300 - 60 * t, 360 - 3 * t)
        faces = [(0, a), (1, b)]
        if iou_matrix([a], [b])[0, 0] > 0.1:  # b passes behind a: the detector sees only a
            faces = [(0, a)]
        frames.append((t, faces))
    assert sum(len(f) == 1 for _, f in frames) >= 2
    ids = ids_per_gt(run(FaceTracker(), frames))
    assert len(set(ids[0])) == 1 and len(set(ids[1])) == 1
    assert ids[0][0] != ids[1][0]


def test_crossing_faces_with_irregular_timestamps():
    ts = np.cumsum([0.0] + [0.5, 0.5, 0.4, 0.7, 0.5, 0.3, 0.5, 0.6, 0.5, 0.5, 0.5, 0.4, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5])
    frames = []
    for t in ts:
        a = box_at(100 + 90 * t, 300)
        b = box_at(1000 - 90 * t, 330)
        frames.append((float(t), [(0, a), (1, b)] if abs(a[0] - b[0]) > 40 else [(1, b)]))
    ids = ids_per_gt(run(FaceTracker(), frames))
    assert len(set(ids[0])) == 1 and len(set(ids[1])) == 1 and ids[0][0] != ids[1][0]


@pytest.mark.parametrize("gap_s", [1.0, 2.0])
def test_occlusion_up_to_2s_keeps_the_id(gap_s):
    frames = []
    for k in range(30):
        t = k / FPS
        faces = [(1, box_at(700, 300))]  # a second, still face nearby
        if not (5.0 <= t < 5.0 + gap_s):
            faces.append((0, box_at(200 + 50 * t, 320)))
        frames.append((t, faces))
    ids = ids_per_gt(run(FaceTracker(), frames))
    assert len(set(ids[0])) == 1, ids[0]
    assert len(set(ids[1])) == 1


def test_face_that_steps_out_and_straight_back_keeps_its_id():
    frames = []
    for k in range(24):
        t = k / FPS
        x = 300 - 120 * t if t < 3.0 else -60 + 120 * (t - 3.0)  # out on the left, turns back
        faces = [(1, box_at(700, 400))]
        if x > 0:  # the detector sees it only while its centre is in the frame
            faces.append((0, box_at(x, 300, 90)))
        frames.append((t, faces))
    seen = [t for t, f in frames if len(f) == 2]
    unseen = max(b - a for a, b in zip(seen, seen[1:]))
    assert 2.0 <= unseen < TrackConfig().lost_s
    ids = ids_per_gt(run(FaceTracker(), frames))
    assert len(set(ids[0])) == 1, ids[0]


def test_false_positive_does_not_take_a_missed_faces_track():
    """A background false positive (score just above the threshold) near a face the detector
    missed for a second starts its own track; the face takes its id back."""
    tracker = FaceTracker()
    frames = []
    for k in range(20):
        t = k / FPS
        faces = [(0, box_at(100 + 90 * t, 220), 0.99)]
        if 8 <= k <= 9:  # the detector misses the face; a false positive behind it instead
            faces = [(9, box_at(100 + 90 * 4.0 - 120, 180, 60), 0.55)]
        frames.append((t, faces))
    got = {}
    for k, (t, faces) in enumerate(frames):
        d = dets_from_boxes([b for _, b, _ in faces], t, k)
        d = d.with_(det_score=np.array([s for _, _, s in faces], np.float32))
        res = tracker.update(d, t)
        for (g, _, _), tid in zip(faces, res.track_id.tolist()):
            got.setdefault(g, set()).add(tid)
    assert len(got[0]) == 1 and got[0].isdisjoint(got[9]), got


def test_leave_and_return_after_lost_s_gives_a_new_id():
    cfg = TrackConfig(lost_s=3.0)
    frames = []
    for k in range(30):
        t = k / FPS
        frames.append((t, [] if 4.0 <= t < 8.0 else [(0, box_at(400, 300))]))  # gone for 4 s
    out = run(FaceTracker(cfg), frames)
    before = {f[0] for (t, _), f in zip(frames, out) if f and t < 4.0}
    after = {f[0] for (t, _), f in zip(frames, out) if f and t >= 8.0}
    assert len(before) == 1 and len(after) == 1 and before != after


def _person_embeddings(n_people: int, dim: int = 64, noise: float = 0.25, seed: int = 1):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_people, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)

    def emb(gt: int, k: int) -> np.ndarray:
        e = base[gt] + noise * np.random.default_rng(1000 * gt + k).normal(size=dim) / np.sqrt(dim)
        return e / np.linalg.norm(e)

    return emb


def test_reid_by_embedding_restores_the_old_id():
    frames = []
    for k in range(40):
        t = k / FPS
        faces = [(1, box_at(900, 500))]
        if t < 4.0:
            faces.append((0, box_at(200 + 20 * t, 300)))
        elif t >= 9.0:  # back after 5 s (> lost_s), somewhere else
            faces.append((0, box_at(600, 150)))
        if t >= 12.0:  # a stranger appears where person 0 left
            faces.append((2, box_at(280, 300)))
        frames.append((t, faces))
    out = run(FaceTracker(TrackConfig(lost_s=3.0)), frames, embeddings=_person_embeddings(3))
    ids = ids_per_gt(out)
    assert len(set(ids[0])) == 1, ids[0]
    assert len(set(ids[1])) == 1
    assert set(ids[2]).isdisjoint(set(ids[0]) | set(ids[1]))


def test_reid_off_ignores_embeddings():
    frames = [(k / FPS, [] if 2.0 <= k / FPS < 6.0 else [(0, box_at(400, 300))]) for k in range(16)]
    out = run(FaceTracker(TrackConfig(reid="off")), frames, embeddings=_person_embeddings(1))
    assert len(set(ids_per_gt(out)[0])) == 2


def test_never_drops_detections_and_ids_unique_per_frame():
    rng = np.random.default_rng(3)
    tracker = FaceTracker()
    seen: set[int] = set()
    for k in range(80):
        n = int(rng.integers(0, 9))
        xy = rng.uniform(0, 1200, size=(n, 2))
        s = rng.uniform(15, 200, size=(n, 1))
        boxes = np.hstack([xy, xy + s])
        if n >= 2:  # an exact duplicate (a detector NMS miss) and a degenerate box
            boxes[1] = boxes[0]
            boxes[-1, 2:] = boxes[-1, :2]
        d = dets_from_boxes(boxes, k / FPS, k)
        res = tracker.update(d, k / FPS)
        assert len(res) == n and res.track_id.dtype == np.int64
        assert (res.track_id >= 0).all() and len(set(res.track_id.tolist())) == n
        np.testing.assert_array_equal(res.xyxy, d.xyxy)
        seen |= set(res.track_id.tolist())
    assert max(seen) < tracker.num_tracks


def test_new_faces_get_ids_from_their_first_frame():
    tracker = FaceTracker()
    r0 = tracker.update(dets_from_boxes([box_at(100, 100)], 0.0), 0.0)
    r1 = tracker.update(dets_from_boxes([box_at(105, 100), box_at(600, 400)], 0.5), 0.5)
    assert r0.track_id.tolist() == [0] and r1.track_id[0] == 0 and r1.track_id[1] == 1


def test_empty_frames_are_fine():
    tracker = FaceTracker()
    assert len(tracker.update(FaceDetections.empty(), 0.0)) == 0
    r1 = tracker.update(dets_from_boxes([box_at(300, 300)], 0.5), 0.5)
    assert len(tracker.update(FaceDetections.empty(), 1.0, embeddings=np.zeros((0, 16)))) == 0
    r3 = tracker.update(dets_from_boxes([box_at(320, 300)], 1.5), 1.5)
    assert r1.track_id[0] == r3.track_id[0]


def test_input_errors_are_typed():
    tracker = FaceTracker()
    tracker.update(dets_from_boxes([box_at(300, 300)], 1.0), 1.0)
    with pytest.raises(DataError, match="must not decrease"):
        tracker.update(dets_from_boxes([box_at(300, 300)], 0.5), 0.5)
    with pytest.raises(DataError, match="finite"):
        tracker.update(FaceDetections.empty(), float("nan"))
    with pytest.raises(DataError, match="embeddings: expected shape"):
        tracker.update(dets_from_boxes([box_at(300, 300)], 2.0), 2.0, embeddings=np.ones((2, 8)))


def test_unknown_options_list_the_valid_ones():
    with pytest.raises(ConfigError, match="valid: lost_s, match_thresh, reid, reid_thresh"):
        track_config(lost_seconds=2.0)
    with pytest.raises(ConfigError, match="auto|on|off"):
        TrackConfig(reid="maybe")
    with pytest.raises(ConfigError):
        TrackConfig(lost_s=0)
    assert track_config(lost_s=2.0).lost_s == 2.0


def test_iou_matrix_hand_checked():
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], float)
    np.testing.assert_allclose(iou_matrix(a, b), [[50 / 150, 0.0, 1.0]])


def test_assignment_lets_an_implausible_track_stay_unmatched():
    """A track with no plausible detection must not push another track off its face."""
    from fer_batch.track import _assign

    cost = np.array([[0.05, 0.9], [0.7, 1e6]])  # track 0 fits detection 0; track 1 fits nothing
    assert _assign(cost, 0.8) == [(0, 0)]
    assert _assign(np.zeros((0, 3)), 0.8) == []
    assert sorted(_assign(np.array([[0.1, 0.2], [0.2, 0.1], [0.3, 0.3]]), 0.8)) == [(0, 0), (1, 1)]
