"""Face tracking across the sampled frames of one source.

The tracker core imports no detector: it takes :class:`~fer_batch.types.FaceDetections` of
one frame, the frame's real timestamp, and optional face embeddings, and fills ``track_id``.

Why hand-written rather than a library (see ``examples/track_bench``):

* ``trackers`` 2.6 (Roboflow; ByteTrack, SORT, OC-SORT) gives ``tracker_id == -1`` to a new
  track's first frame and to unmatched low-score boxes, and reorders its output, which breaks
  "every face gets an id from its first frame on". Its association is IoU only, which has
  little to work with at 2 fps, where a face often moves more than its own width between
  samples: on the benchmark its ByteTrack scores IDF1 0.3-0.8 where this tracker scores
  0.96-0.99. (The benchmark does use its TrackEval port for the metrics.)
* ``norfair`` 2.3 pins ``numpy<2`` (the project runs numpy 2; pip would also downgrade rich)
  and has no re-identification against ended tracks by embedding.

So this module is a compact tracker in the SORT family, built for sparse sampling:

* per track, a constant-velocity Kalman filter on the face centre that uses the real time
  step ``dt`` between samples; process noise scales with the face size, so uncertainty (and
  the matching gate) grows with the time a face has been unseen;
* Hungarian assignment (``scipy.optimize.linear_sum_assignment``) on a cost that mixes the
  normalised Kalman distance of the centre (for a face missed in the last frames, the closer of
  "kept moving" and "stayed where last seen"), ``1 - IoU`` with the predicted box, the size
  ratio, the detection score (doubtful boxes need a closer match, so a background false
  positive does not take over the track of a face the detector missed) and, when given, the
  cosine distance of the embeddings;
* the assignment may leave any track or detection unmatched (padded problem), so a track with
  no plausible detection never displaces another track from its face;
* a track unseen for more than ``lost_s`` ends; with embeddings, a face that matches no live
  track is compared with the ended (and unmatched) tracks and takes back the id of the most
  similar one when the cosine similarity reaches ``reid_thresh``;
* every detection that matches nothing starts a new track at once: no detection is dropped
  and none waits for confirmation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from fer_batch.config import REID_MODES, TrackConfig
from fer_batch.errors import ConfigError, DataError
from fer_batch.types import FaceDetections


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``scipy.optimize.linear_sum_assignment``, imported on first use: scipy.optimize costs
    about 50 MB of memory, which the run's driver process (it only merges) never needs."""
    from scipy.optimize import linear_sum_assignment as lsa

    return lsa(cost)


log = logging.getLogger(__name__)

# The tuning values of the tracker (motion model, gates, cost weights) are fields of
# :class:`~fer_batch.config.TrackConfig`, documented there, so they are recorded with the outputs.
_INF = 1e6


def track_config(**options) -> TrackConfig:
    """A :class:`TrackConfig` from keyword options; unknown names raise listing valid ones."""
    valid = [f.name for f in dataclasses.fields(TrackConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown tracking option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return TrackConfig(**options)


@dataclass
class _Track:
    """State of one track: a constant-velocity Kalman filter on the face centre.

    x and y share one 2x2 covariance ``P`` over (position, velocity): the noise is isotropic
    and both axes are observed together, so the two covariances stay equal.
    """

    p: TrackConfig  # tuning values
    track_id: int
    pos: np.ndarray  # (2,) centre at time t_state
    vel: np.ndarray  # (2,) px / s
    P: np.ndarray  # (2, 2) covariance of (position, velocity) per axis
    size: float  # smoothed sqrt(w * h)
    wh: np.ndarray  # (2,) last observed width, height
    t_state: float  # time the state refers to
    last_seen: float
    last_pos: np.ndarray | None = None  # (2,) centre when last seen
    misses: int = 0  # frames in a row without a detection
    best_score: float = 1.0  # highest detection score seen on this track
    hits: int = 1
    emb_sum: np.ndarray | None = None
    emb: np.ndarray | None = field(default=None)  # L2-normalised mean embedding
    n_emb: int = 0  # embeddings averaged into ``emb``
    last_emb_t: float = -math.inf  # time of the last one

    @classmethod
    def start(
        cls, p: TrackConfig, track_id: int, box: np.ndarray, t: float, emb: np.ndarray | None, score: float
    ) -> "_Track":
        trk = cls(p, track_id, np.zeros(2), np.zeros(2), np.eye(2), 1.0, np.ones(2), t, t, best_score=score)
        trk.reset(box, t)
        if emb is not None:
            trk.add_embedding(emb, t)
        return trk

    def add_embedding(self, emb: np.ndarray, t: float) -> None:
        """Average one more (L2-normalised) embedding into the track's appearance."""
        if self.emb_sum is None or self.emb_sum.shape != emb.shape:
            self.emb_sum, self.n_emb = np.zeros_like(emb, dtype=np.float64), 0
        self.emb_sum = self.emb_sum + emb
        self.n_emb += 1
        self.last_emb_t = t
        n = np.linalg.norm(self.emb_sum)
        self.emb = self.emb_sum / n if n > 0 else None

    def wants_embedding(self, t: float) -> bool:
        """A few samples per track, spaced out in time (``reid_samples``, ``reid_gap_s``)."""
        return self.n_emb < self.p.reid_samples and t - self.last_emb_t >= self.p.reid_gap_s

    def reset(self, box: np.ndarray, t: float) -> None:
        """Restart the filter at ``box`` with zero velocity (new track or re-identified)."""
        c, wh, s = _geom(box[None])
        self.pos, self.wh, self.size = c[0].astype(np.float64), wh[0].astype(np.float64), float(s[0])
        self.vel = np.zeros(2)
        self.last_pos, self.misses = self.pos.copy(), 0
        self.P = np.diag([(self.p.meas_std * self.size) ** 2, (self.p.init_vel_std * self.size) ** 2])
        self.t_state = self.last_seen = t

    def predict(self, t: float) -> None:
        dt = max(t - self.t_state, 0.0)
        if dt > 0:
            F = np.array([[1.0, dt], [0.0, 1.0]])
            q = (self.p.accel_std * self.size) ** 2
            Q = q * np.array([[dt**3 / 3, dt**2 / 2], [dt**2 / 2, dt]])
            self.pos = self.pos + self.vel * dt
            self.P = F @ self.P @ F.T + Q
        self.t_state = t

    def innovation_var(self) -> float:
        return float(self.P[0, 0] + (self.p.meas_std * self.size) ** 2)

    def update(self, box: np.ndarray, t: float, emb: np.ndarray | None, score: float) -> None:
        c, wh, s = _geom(box[None])
        self.best_score = max(self.best_score, score)
        S = self.innovation_var()
        K = self.P[:, 0] / S  # gain for (position, velocity)
        y = c[0] - self.pos
        self.pos = self.pos + K[0] * y
        self.vel = self.vel + K[1] * y
        self.P = self.P - np.outer(K, self.P[0, :])
        vmax = self.p.max_speed * self.size
        speed = float(np.hypot(*self.vel))
        if speed > vmax:
            self.vel *= vmax / speed
        self.size = (1 - self.p.size_ema) * self.size + self.p.size_ema * float(s[0])
        self.wh = wh[0].astype(np.float64)
        self.last_seen = t
        self.last_pos, self.misses = self.pos.copy(), 0
        self.hits += 1
        if emb is not None:
            self.add_embedding(emb, t)

    def box(self) -> np.ndarray:
        return np.concatenate([self.pos - self.wh / 2, self.pos + self.wh / 2])


def _geom(xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (N, 2), sizes (w, h) (N, 2) and scalar face sizes sqrt(w*h) (N,)."""
    xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
    wh = np.maximum(xyxy[:, 2:] - xyxy[:, :2], 1.0)
    return (xyxy[:, :2] + xyxy[:, 2:]) / 2, wh, np.sqrt(wh[:, 0] * wh[:, 1])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), xyxy."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _ambiguous(cost: np.ndarray, margin: float) -> np.ndarray:
    """Detections (columns) motion cannot settle: a second track, or a second detection of the
    best track, within ``margin`` of the best pair's cost (both inside the gate)."""
    ok = cost < _INF
    c = np.where(ok, cost, _INF)
    n, m = c.shape
    out = np.zeros(m, bool)
    if n > 1:  # a second track close to the best one for this face
        s = np.sort(c, axis=0)
        out |= (s[1] < _INF) & (s[1] - s[0] < margin)
    if m > 1:  # the best track of some face has a second face close to it
        close = ok & (c - c.min(axis=1, keepdims=True) < margin)
        out |= (close & (close.sum(1, keepdims=True) > 1)).any(0)
    return out


def _assign(cost: np.ndarray, max_cost: float) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one assignment in which leaving a row or column unmatched is allowed.

    Plain ``linear_sum_assignment`` on a gated matrix must still match every row (or column):
    a track with no plausible detection then takes one anyway and pushes the right track off
    it, and dropping the over-threshold pair afterwards does not undo that. So the problem is
    padded: each row and each column may instead take a "no match" slot costing
    ``max_cost / 2``, so a pair is only matched when it costs less than ``max_cost``, and the
    total over all pairs is what is minimised.
    """
    n, m = cost.shape
    if n == 0 or m == 0:
        return []
    big = 1e9
    c = np.where(np.isfinite(cost) & (cost <= max_cost), cost, big)
    half = max_cost / 2.0
    pad = np.full((n + m, m + n), big)
    pad[:n, :m] = c
    pad[:n, m:][np.diag_indices(n)] = half  # row i unmatched
    pad[n:, :m][np.diag_indices(m)] = half  # column j unmatched
    pad[n:, m:] = 0.0
    rows, cols = linear_sum_assignment(pad)
    return [(int(r), int(k)) for r, k in zip(rows, cols) if r < n and k < m and c[r, k] < big]


class FaceTracker:
    """Assigns stable track ids to the faces of one source, frame by frame.

    One instance per source (or per segment); no detector import. Thresholds (see
    :class:`~fer_batch.config.TrackConfig`):

    * ``lost_s``: how long a track may go unseen and still take its face back by motion.
      Raising it bridges longer occlusions but lets a different face that shows up near a
      lost one inherit its id; lowering it gives returning faces new ids sooner.
    * ``match_thresh``: the highest association cost (0..1) that still continues a track.
      Raising it joins more (fewer new ids, more risk of swapping ids between close faces);
      lowering it splits more.
    * ``reid``: ``off`` ignores embeddings; ``auto``/``on`` use them when passed (the
      pipeline decides whether the pack can compute them).
    * ``reid_thresh``: the cosine similarity an embedding needs to re-identify an ended track.
      Raising it gives fewer wrong merges of different people but more new ids for returning
      faces; lowering it does the reverse. None: 0.5 (InsightFace's ArcFace models); the
      pipeline sets the value measured for the embedding model it uses (its card).

    Embeddings are passed either for every face (``embeddings``) or on demand (``embed``, a
    callable the tracker asks for the rows it needs: faces that no live track takes by motion,
    faces that more than one track could take, and a few samples per track, ``reid_samples``
    at least ``reid_gap_s`` apart), so a face is embedded only when it pays.
    """

    def __init__(self, cfg: TrackConfig | None = None):
        cfg = TrackConfig() if cfg is None else cfg
        if not isinstance(cfg, TrackConfig):  # its values were checked when it was built
            raise ConfigError(f"FaceTracker: expected a TrackConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.reid_thresh = 0.5 if cfg.reid_thresh is None else float(cfg.reid_thresh)
        self._live: list[_Track] = []
        self._gallery: list[_Track] = []  # ended tracks that carry an embedding
        self._next_id = 0
        self._last_t: float | None = None
        self._emb_dim: int | None = None

    @property
    def num_tracks(self) -> int:
        """How many track ids have been given out so far."""
        return self._next_id

    def update(
        self, dets: FaceDetections, timestamp_s: float, embeddings: np.ndarray | None = None, embed=None
    ) -> FaceDetections:
        """Assign track ids to the faces of ONE sampled frame.

        Args:
            dets: the faces of one frame.
            timestamp_s: the frame's real presentation time (seconds); must not decrease.
            embeddings: optional (N, D) face embeddings (L2-normalised here again), used to
                match faces and to re-identify faces lost for longer than ``lost_s``.
            embed: optional callable ``embed(rows) -> (len(rows), D)`` computing embeddings
                of the given rows of ``dets`` on demand (ignored when ``embeddings`` is given).

        Returns:
            The same rows in the same order with ``track_id`` filled (int64 >= 0, unique
            within the source and within the frame, stable across frames).

        Raises:
            DataError: a timestamp that is not finite or goes back in time; embeddings of the
                wrong shape or with non-finite values.
        """
        t = self._check_time(timestamp_s)
        n = len(dets)
        emb = self._check_embeddings(embeddings, n)
        self._end_lost(t)
        if emb is None and embed is not None and n and self.cfg.reid != "off":
            return self._update_lazy(dets, t, embed)
        ids = np.full(n, -1, np.int64)
        if n == 0:
            for trk in self._live:
                trk.predict(t)
                trk.misses += 1
            return dets.with_(track_id=ids)
        boxes = np.asarray(dets.xyxy, np.float64)
        scores = np.nan_to_num(np.asarray(dets.det_score, np.float64), nan=0.0)

        # 1) live tracks by motion (+ appearance), one-to-one.
        for trk in self._live:
            trk.predict(t)
        matched_trk: set[int] = set()
        if self._live:
            cost = self._cost(self._live, boxes, emb, scores)
            for r, c in _assign(cost, self.cfg.match_thresh):
                self._live[r].update(boxes[c], t, None if emb is None else emb[c], float(scores[c]))
                ids[c] = self._live[r].track_id
                matched_trk.add(r)

        for i, trk in enumerate(self._live):
            if i not in matched_trk:
                trk.misses += 1

        # 2) re-identification by embedding: unmatched faces vs ended and unmatched tracks.
        free = np.flatnonzero(ids < 0)
        if emb is not None and len(free):
            self._reidentify(emb, free, matched_trk, boxes, scores, t, ids)

        # 3) every face still without a track starts one now.
        for j in np.flatnonzero(ids < 0):
            trk = _Track.start(self.cfg, self._next_id, boxes[j], t, None if emb is None else emb[j], float(scores[j]))
            self._next_id += 1
            self._live.append(trk)
            ids[j] = trk.track_id
        return dets.with_(track_id=ids)

    def _update_lazy(self, dets: FaceDetections, t: float, embed) -> FaceDetections:
        """``update`` that asks ``embed`` only for the rows where appearance matters."""
        n = len(dets)
        ids = np.full(n, -1, np.int64)
        boxes = np.asarray(dets.xyxy, np.float64)
        scores = np.nan_to_num(np.asarray(dets.det_score, np.float64), nan=0.0)
        emb: np.ndarray | None = None  # (n, D), NaN rows not computed yet

        def need(rows) -> None:
            nonlocal emb
            rows = [int(r) for r in rows if emb is None or not np.isfinite(emb[int(r)]).all()]
            if not rows:
                return
            e = self._check_embeddings(embed(np.asarray(rows, np.int64)), len(rows))
            if e is None:
                return
            if emb is None:
                emb = np.full((n, e.shape[1]), np.nan)
            emb[rows] = e

        for trk in self._live:
            trk.predict(t)
        matched: dict[int, int] = {}  # track index -> row
        if self._live:
            cost = self._cost(self._live, boxes, None, scores)
            ambiguous = _ambiguous(cost, self.cfg.reid_margin)
            if ambiguous.any() and any(trk.emb is not None for trk in self._live):
                need(np.flatnonzero(ambiguous))
                if emb is not None:
                    cost = self._cost(self._live, boxes, emb, scores)
            for r, c in _assign(cost, self.cfg.match_thresh):
                self._live[r].update(boxes[c], t, None, float(scores[c]))
                ids[c] = self._live[r].track_id
                matched[r] = c
        for i, trk in enumerate(self._live):
            if i not in matched:
                trk.misses += 1
        # one call for the rest: faces without a track, and tracks that want a sample
        free = np.flatnonzero(ids < 0)
        sample = {r: c for r, c in matched.items() if self._live[r].wants_embedding(t)}
        need(list(free) + list(sample.values()))
        if emb is not None:
            for r, c in sample.items():
                if np.isfinite(emb[c]).all():
                    self._live[r].add_embedding(emb[c], t)
        if emb is not None and len(free):
            self._reidentify(emb, free, matched, boxes, scores, t, ids)
        for j in np.flatnonzero(ids < 0):
            e = None if emb is None or not np.isfinite(emb[j]).all() else emb[j]
            trk = _Track.start(self.cfg, self._next_id, boxes[j], t, e, float(scores[j]))
            self._next_id += 1
            self._live.append(trk)
            ids[j] = trk.track_id
        return dets.with_(track_id=ids)

    # -- helpers --------------------------------------------------------------------------

    def _reidentify(self, emb: np.ndarray, free: np.ndarray, matched, boxes: np.ndarray, scores: np.ndarray, t: float,
                    ids: np.ndarray) -> None:
        """Give the faces ``free`` (no track by motion) the id of an unmatched live or ended track whose
        embedding is within ``reid_thresh`` (Hungarian on cosine similarity); fills ``ids`` in place."""
        cands = [trk for i, trk in enumerate(self._live) if i not in matched and trk.emb is not None]
        cands += self._gallery
        cands = [c for c in cands if c.emb.shape == emb.shape[1:]]
        if not cands:
            return
        sim = np.stack([c.emb for c in cands]) @ emb[free].T
        for r, c in _assign(1.0 - sim, 1.0 - self.reid_thresh):
            trk, j = cands[r], int(free[c])
            log.debug("track %d re-identified (cosine %.3f)", trk.track_id, sim[r, c])
            trk.reset(boxes[j], t)
            trk.update(boxes[j], t, emb[j], float(scores[j]))
            if any(g is trk for g in self._gallery):
                self._gallery = [g for g in self._gallery if g is not trk]
                self._live.append(trk)
            ids[j] = trk.track_id

    def _check_time(self, timestamp_s: float) -> float:
        t = float(timestamp_s)
        if not math.isfinite(t):
            raise DataError(f"FaceTracker.update: timestamp must be finite, got {timestamp_s!r}")
        if self._last_t is not None and t < self._last_t:
            raise DataError(
                f"FaceTracker.update: timestamps must not decrease (got {t} after {self._last_t}); "
                "use one tracker per source or segment"
            )
        self._last_t = t
        return t

    def _check_embeddings(self, embeddings: np.ndarray | None, n: int) -> np.ndarray | None:
        if embeddings is None or self.cfg.reid == "off":
            return None
        e = np.asarray(embeddings, np.float64)
        if e.ndim != 2 or e.shape[0] != n:
            raise DataError(f"FaceTracker.update: embeddings: expected shape ({n}, D), got {e.shape}")
        if n == 0:
            return None
        if not np.isfinite(e).all():
            raise DataError("FaceTracker.update: embeddings contain NaN or inf")
        if self._emb_dim is not None and e.shape[1] != self._emb_dim:
            raise DataError(f"FaceTracker.update: embedding size changed from {self._emb_dim} to {e.shape[1]}")
        self._emb_dim = e.shape[1]
        norm = np.linalg.norm(e, axis=1, keepdims=True)
        return e / np.maximum(norm, 1e-12)

    def _end_lost(self, t: float) -> None:
        """Tracks unseen for longer than ``lost_s`` end; those with an embedding stay for re-id."""
        c = self.cfg
        keep = []
        for trk in self._live:
            if t - trk.last_seen > self.cfg.lost_s:
                if trk.emb is not None and self.cfg.reid != "off":
                    self._gallery.append(trk)
            else:
                keep.append(trk)
        self._live = keep
        if len(self._gallery) > c.max_gallery:
            self._gallery = self._gallery[-c.max_gallery:]

    def _cost(self, tracks: list[_Track], boxes: np.ndarray, emb: np.ndarray | None, scores: np.ndarray) -> np.ndarray:
        """Association cost (tracks x detections), about [0, 1 + w_score]; ``_INF`` where gated out."""
        c = self.cfg
        centres, _, sizes = _geom(boxes)
        pos = np.stack([trk.pos for trk in tracks])
        tsize = np.array([trk.size for trk in tracks])
        std = np.sqrt([trk.innovation_var() for trk in tracks])
        dist = np.linalg.norm(centres[None, :, :] - pos[:, None, :], axis=2)
        # A face unseen in the last frame(s) either kept moving (the prediction) or stopped or
        # turned back while hidden (where it was last seen): take the closer of the two.
        missed = np.array([trk.misses > 0 for trk in tracks])
        if missed.any():
            last = np.stack([trk.last_pos for trk in tracks])
            d_last = np.linalg.norm(centres[None, :, :] - last[:, None, :], axis=2) + c.last_seen_penalty * tsize[:, None]
            dist = np.where(missed[:, None], np.minimum(dist, d_last), dist)
        gate = np.minimum(c.gate_sigma * std, c.gate_max_sizes * tsize)[:, None]
        motion = dist / gate
        overlap = iou_matrix(np.stack([trk.box() for trk in tracks]), boxes)
        log_ratio = np.abs(np.log(sizes[None, :] / tsize[:, None]))
        size_term = log_ratio / math.log(c.max_size_ratio)
        cost = c.w_motion * np.minimum(motion, 1.0) + c.w_iou * (1.0 - overlap) + c.w_size * np.minimum(size_term, 1.0)
        if emb is not None:
            has = np.array([trk.emb is not None and trk.emb.shape == emb.shape[1:] for trk in tracks])
            col = np.isfinite(emb).all(1)  # rows embedded (on-demand embedding leaves others NaN)
            if has.any() and col.any():
                sim = np.zeros((len(tracks), len(boxes)))
                sim[np.ix_(has, col)] = np.stack([tracks[i].emb for i in np.flatnonzero(has)]) @ emb[col].T
                # appearance distance in units of the re-id threshold: 0.5 at the threshold,
                # whatever the model's similarity scale (1 - cosine for a threshold of 0.5)
                app = np.clip(0.5 * (1.0 - sim) / max(1.0 - self.reid_thresh, 1e-6), 0.0, 1.0)
                use = has[:, None] & col[None, :]
                cost = np.where(use, (1 - c.w_emb) * cost + c.w_emb * app, cost)
        best = np.array([trk.best_score for trk in tracks])
        cost = cost + c.w_score * np.clip(1.0 - np.minimum(scores[None, :], best[:, None]), 0.0, 1.0)
        gated = (motion > 1.0) | (size_term > 1.0)
        return np.where(gated, _INF, cost)


__all__ = ["FaceTracker", "track_config", "iou_matrix", "REID_MODES"]
