"""Key figures of a fer-batch output: pure functions over pandas DataFrames.

Nothing here reads files or draws: the inputs are the faces / sources tables of
``fer-batch process`` (columns from :mod:`fer_batch.schema`) as DataFrames, the outputs are
plain dataclasses that the HTML report, the ``summary`` command and the tests share.

Definitions (the report and the summary say the same):

- **Probabilities used**: the smoothed columns ``p_<emotion>_smoothed`` where present (a run
  with ``--smooth``), else the raw ``p_<emotion>``; rows whose smoothed value is null fall back
  to raw.
- **Dominant emotion** of a row: the argmax of those probabilities.
- **Sampling period** ``dt`` of a source: the median gap between its distinct sampled
  timestamps (0 for a single image). Every row stands for ``dt`` seconds of its face's time,
  so *share of time* in an emotion is the share of a track's rows with that dominant emotion,
  and *face time* is rows x ``dt``. Where no source has a period (images only), rows count 1.
- **Valence groups**: positive = happy; negative = angry, disgust, fear, sad; neutral =
  neutral; surprise is kept apart (its valence is ambiguous).
- **Emotion changes per minute**: changes of the dominant emotion along each track, after
  dropping stretches shorter than ``min_dwell_s`` (one-frame flicker is not a change),
  divided by the face-minutes of all tracks.
- **Key moments** (per track): ``peak`` = a local maximum of a negative emotion's
  probability at or above ``peak_threshold`` (outside a sustained stretch of the same emotion,
  which already records its maximum); ``sustained`` = a stretch of consecutive
  samples with one negative emotion's probability at or above ``sustain_threshold`` lasting
  at least ``sustain_min_s``; ``surprise`` = the track's strongest surprise, if at or above
  ``surprise_threshold``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fer_batch.errors import ConfigError
from fer_batch.report.columns import (
    BOX,
    FRAME_INDEX,
    PROBS,
    SMOOTHED,
    SOURCE_ID,
    SOURCE_PATH,
    SRC_DURATION,
    SRC_ERROR,
    SRC_ID,
    SRC_KIND,
    SRC_PATH,
    SRC_STATUS,
    TIMESTAMP,
    TRACK_ID,
)
from fer_batch.schema import SOURCE_STATUSES
from fer_batch.types import EMOTIONS

# The status shown for a sources-table row whose status is none of SOURCE_STATUSES (a file
# written by something else, or tampered with); its error says what the value was.
INVALID_STATUS = "invalid"

NEGATIVE: tuple[str, ...] = ("angry", "disgust", "fear", "sad")
POSITIVE: tuple[str, ...] = ("happy",)
NEUTRAL: tuple[str, ...] = ("neutral",)
VALENCE_GROUPS: dict[str, tuple[str, ...]] = {
    "positive": POSITIVE,
    "negative": NEGATIVE,
    "neutral": NEUTRAL,
    "surprise": ("surprise",),
}


@dataclass(frozen=True)
class MomentParams:
    """Thresholds of key-moment detection and change counting.

    Attributes:
        peak_threshold: minimum probability of a negative-emotion peak. Raising it reports only
            strong, confident peaks (fewer false alarms, may miss mild episodes); lowering it
            reports more, including classifier noise on neutral faces.
        peak_min_separation_s: peaks of the same emotion closer than this keep only the higher
            one. Raising it thins out bursts into one moment; lowering it lists every wiggle.
        max_peaks_per_track: the strongest N peaks per track are kept (caps the list length on
            long videos; raising it shows more, lowering it keeps the report short).
        sustain_threshold: minimum probability for a sample to count toward a sustained
            stretch. Raising it keeps only clear episodes and splits stretches where the
            probability dips; lowering it merges more and reports longer, weaker stretches.
        sustain_min_s: minimum duration of a sustained stretch. Raising it ignores brief
            episodes; lowering it reports short ones (down to a single sample at 0).
        max_gap_s: a gap between two consecutive samples of a track longer than this breaks
            a stretch (the face was not seen). ``None``: 2.5 x the sampling period. Raising it
            bridges longer absences; lowering it splits stretches at every missed detection.
        surprise_threshold: the strongest surprise of a track is reported only at or above
            this probability. Raising it reports only unmistakable surprise.
        min_dwell_s: for counting emotion changes, a dominant emotion must hold at least this
            long to count as a new state. Raising it counts only lasting changes (lower
            changes-per-minute); lowering it counts flicker of the classifier (at 0 every
            frame-to-frame change counts).
    """

    peak_threshold: float = 0.6
    peak_min_separation_s: float = 5.0
    max_peaks_per_track: int = 5
    sustain_threshold: float = 0.5
    sustain_min_s: float = 3.0
    max_gap_s: float | None = None
    surprise_threshold: float = 0.5
    min_dwell_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("peak_threshold", "sustain_threshold", "surprise_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name}: expected a probability in [0, 1], got {v}")
        for name in ("peak_min_separation_s", "sustain_min_s", "min_dwell_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected >= 0 seconds, got {getattr(self, name)}")
        if self.max_gap_s is not None and self.max_gap_s <= 0:
            raise ConfigError(f"max_gap_s: expected > 0 seconds or None, got {self.max_gap_s}")
        if self.max_peaks_per_track < 0:
            raise ConfigError(f"max_peaks_per_track: expected >= 0, got {self.max_peaks_per_track}")

    def gap_for(self, dt: float) -> float:
        """The gap that breaks a stretch, for a source sampled every ``dt`` seconds."""
        if self.max_gap_s is not None:
            return self.max_gap_s
        return 2.5 * dt if dt > 0 else float("inf")


@dataclass(frozen=True)
class Moment:
    """One key moment of a track.

    ``start_s``/``end_s`` bound the samples involved (a peak has start == end == its time);
    ``duration_s`` counts each sample as one sampling period; ``time_s`` and ``frame_index``
    are the sample with the highest ``value`` (used for thumbnails).
    """

    kind: str  # "peak" | "sustained" | "surprise"
    emotion: str
    start_s: float
    end_s: float
    duration_s: float
    time_s: float
    frame_index: int
    value: float  # peak / max probability
    mean: float  # mean probability over the samples
    track_id: int
    box: tuple[float, float, float, float] | None = None  # xyxy of the face at time_s


@dataclass
class TrackFigures:
    """Figures of one face track."""

    track_id: int
    first_s: float
    last_s: float
    rows: int
    face_time_s: float
    dominant: str  # the emotion with the largest share of time
    shares: dict[str, float]  # emotion -> share of the track's time (sums to 1)
    valence: dict[str, float]
    changes: int
    changes_per_min: float | None
    moments: list[Moment] = field(default_factory=list)


@dataclass
class SourceFigures:
    """Figures of one source (video, image or image sequence)."""

    source_id: str
    path: str
    kind: str | None
    status: str
    error: str | None
    duration_s: float | None
    dt: float
    rows: int
    faces: int  # tracks
    face_time_s: float
    shares: dict[str, float]
    valence: dict[str, float]
    dominant: str | None
    changes: int
    changes_per_min: float | None
    smoothed: bool
    tracks: list[TrackFigures] = field(default_factory=list)

    @property
    def moments(self) -> list[Moment]:
        return sorted((m for t in self.tracks for m in t.moments), key=lambda m: (m.start_s, m.track_id))

    def summary_row(self) -> dict[str, Any]:
        """The source's key figures as one flat row (summary table / CSV / JSON)."""
        neg = [m for m in self.moments if m.kind in ("peak", "sustained")]
        top = max(neg, key=lambda m: m.value) if neg else None
        return {
            "source_id": self.source_id,
            "path": self.path,
            "status": self.status,
            **_common_figures(self),
            "key_moments": len(self.moments),
            "negative_moments": len(neg),
            "top_negative": f"{top.emotion} {top.value:.2f} @{top.time_s:.1f}s" if top else None,
            "error": self.error,
        }


def _common_figures(f) -> dict[str, Any]:
    """The figures a source row and the session summary share (same names, same rounding)."""
    return {
        "duration_s": _round(f.duration_s),
        "faces": f.faces,
        "rows": f.rows,
        "face_time_s": _round(f.face_time_s),
        "dominant": f.dominant,
        **_shares_out(f.valence, f.shares, f.rows),
        "changes_per_min": _round(f.changes_per_min),
    }


@dataclass
class SessionFigures:
    """Figures of a whole report (all sources)."""

    sources: list[SourceFigures]
    params: MomentParams
    duration_s: float
    faces: int
    rows: int
    face_time_s: float
    shares: dict[str, float]
    valence: dict[str, float]
    dominant: str | None
    changes: int
    changes_per_min: float | None
    status_counts: dict[str, int]
    smoothed: bool

    def summary(self) -> dict[str, Any]:
        """Session-level key figures as a flat dict."""
        return {
            "sources": len(self.sources),
            **{f"sources_{k}": v for k, v in self.status_counts.items()},
            **_common_figures(self),
            "key_moments": sum(len(s.moments) for s in self.sources),
            "smoothed": self.smoothed,
        }

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "session": self.summary(),
            "params": asdict(self.params),
            "sources": [s.summary_row() for s in self.sources],
            "moments": [
                {"source_id": s.source_id, **{k: v for k, v in asdict(m).items() if k != "box"}}
                for s in self.sources
                for m in s.moments
            ],
        }


def _shares_out(valence: dict[str, float], shares: dict[str, float], rows: int) -> dict[str, float | None]:
    """``share_<group>`` and ``share_<emotion>`` fields; None (undefined) without any face."""
    out = {f"share_{k}": _round(v, 4) for k, v in valence.items()}
    out.update({f"share_{e}": _round(shares.get(e, 0.0), 4) for e in EMOTIONS})
    return {k: (v if rows else None) for k, v in out.items()}


def _round(v: float | None, nd: int = 3) -> float | None:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return None
    return round(float(v), nd)


# ---------------------------------------------------------------- building blocks


def effective_probs(df: pd.DataFrame) -> tuple[np.ndarray, bool]:
    """The (N, 7) probabilities to use (smoothed where present, else raw) and whether any
    smoothed values were used."""
    raw = df[list(PROBS)].to_numpy(dtype=np.float64)
    if not all(c in df.columns for c in SMOOTHED):
        return raw, False
    sm = df[list(SMOOTHED)].to_numpy(dtype=np.float64, na_value=np.nan)
    ok = ~np.isnan(sm).any(axis=1)
    if not ok.any():
        return raw, False
    out = raw.copy()
    out[ok] = sm[ok]
    return out, True


def dominant_labels(probs: np.ndarray) -> np.ndarray:
    """Argmax emotion name per row of an (N, 7) probability array."""
    if len(probs) == 0:
        return np.array([], dtype=object)
    return np.asarray(EMOTIONS, dtype=object)[np.argmax(probs, axis=1)]


def sampling_period(timestamps: np.ndarray | pd.Series) -> float:
    """Median gap between distinct sorted timestamps; 0.0 with fewer than two."""
    t = np.unique(np.asarray(timestamps, dtype=np.float64))
    if len(t) < 2:
        return 0.0
    return float(np.median(np.diff(t)))


def emotion_shares(labels: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """Share of (weighted) rows per emotion, in EMOTIONS order; all zeros when empty."""
    labels = np.asarray(labels, dtype=object)
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if total <= 0:
        return {e: 0.0 for e in EMOTIONS}
    return {e: float(w[labels == e].sum() / total) for e in EMOTIONS}


def valence_shares(shares: dict[str, float]) -> dict[str, float]:
    """Emotion shares summed into positive / negative / neutral / surprise."""
    return {g: float(sum(shares.get(e, 0.0) for e in members)) for g, members in VALENCE_GROUPS.items()}


def top_emotion(shares: dict[str, float]) -> str | None:
    """The emotion with the largest share (first in EMOTIONS order on ties); None if empty."""
    if not shares or max(shares.values()) <= 0:
        return None
    return max(EMOTIONS, key=lambda e: (shares.get(e, 0.0), -EMOTIONS.index(e)))


def label_runs(labels: np.ndarray) -> list[tuple[str, int, int]]:
    """Run-length encoding of a label sequence: (label, first_index, last_index) per run."""
    runs: list[tuple[str, int, int]] = []
    for i, lab in enumerate(labels):
        if runs and runs[-1][0] == lab:
            runs[-1] = (lab, runs[-1][1], i)
        else:
            runs.append((lab, i, i))
    return runs


def count_changes(labels: np.ndarray, dt: float, min_dwell_s: float) -> int:
    """Changes of the dominant emotion along one track, ignoring stretches shorter than
    ``min_dwell_s`` (a stretch of k samples lasts k x dt).

    Short stretches are dropped, then equal neighbours merge; the changes are the number of
    remaining stretches minus one.
    """
    runs = label_runs(labels)
    if dt > 0:
        kept = [r for r in runs if (r[2] - r[1] + 1) * dt >= min_dwell_s - 1e-9]
    else:
        kept = runs
    merged: list[str] = []
    for lab, _, _ in kept:
        if not merged or merged[-1] != lab:
            merged.append(lab)
    return max(len(merged) - 1, 0)


def local_maxima(v: np.ndarray) -> np.ndarray:
    """Indices of local maxima of ``v``: runs of equal values higher than the values on both
    sides (the array's ends count as lower), one index per run, at its middle."""
    v = np.asarray(v, dtype=np.float64)
    if len(v) == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], v[1:] != v[:-1]]))
    ends = np.concatenate([starts[1:] - 1, [len(v) - 1]])
    vals = v[starts]
    left = np.concatenate([[-np.inf], vals[:-1]])
    right = np.concatenate([vals[1:], [-np.inf]])
    peak = (vals > left) & (vals > right)
    return ((starts[peak] + ends[peak]) // 2).astype(np.int64)


def find_peaks(times: np.ndarray, values: np.ndarray, threshold: float, min_separation_s: float, max_n: int) -> list[int]:
    """Indices of peaks at or above ``threshold``, strongest first kept, none within
    ``min_separation_s`` of a stronger one, at most ``max_n``, returned in time order.

    A peak is a sample higher than its neighbours (a flat top gives one peak at its middle;
    the first and last samples can be peaks).
    """
    v = np.asarray(values, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    if len(v) == 0 or max_n <= 0:
        return []
    cand = local_maxima(v)
    cand = cand[v[cand] >= threshold]
    order = cand[np.lexsort((t[cand], -v[cand]))]  # strongest first; ties: earlier first
    chosen: list[int] = []
    for i in order:
        if all(abs(t[i] - t[j]) >= min_separation_s for j in chosen):
            chosen.append(int(i))
            if len(chosen) >= max_n:
                break
    return sorted(chosen, key=lambda i: t[i])


def sustained_stretches(
    times: np.ndarray, values: np.ndarray, threshold: float, min_s: float, dt: float, max_gap_s: float
) -> list[tuple[int, int]]:
    """(first, last) index pairs of maximal stretches of consecutive samples with
    ``values >= threshold``, no gap between samples above ``max_gap_s``, lasting at least
    ``min_s`` (duration = last - first time + dt)."""
    t = np.asarray(times, dtype=np.float64)
    above = np.asarray(values, dtype=np.float64) >= threshold
    out: list[tuple[int, int]] = []
    start: int | None = None
    for i in range(len(t) + 1):
        cont = i < len(t) and above[i] and (start is None or t[i] - t[i - 1] <= max_gap_s + 1e-9)
        if start is not None and not cont:
            last = i - 1
            if t[last] - t[start] + dt >= min_s - 1e-9:
                out.append((start, last))
            start = None
        if i < len(t) and above[i] and start is None:
            start = i
    return out


# ---------------------------------------------------------------- per track / source / session


def _box(track: pd.DataFrame, i: int) -> tuple[float, float, float, float] | None:
    if not all(c in track.columns for c in BOX):
        return None
    r = track.iloc[i]
    return (float(r[BOX[0]]), float(r[BOX[1]]), float(r[BOX[2]]), float(r[BOX[3]]))


def track_moments(track: pd.DataFrame, probs: np.ndarray, dt: float, params: MomentParams) -> list[Moment]:
    """Key moments of one track (rows sorted by time; ``probs`` aligned with them)."""
    t = track[TIMESTAMP].to_numpy(dtype=np.float64)
    fi = track[FRAME_INDEX].to_numpy(dtype=np.int64) if FRAME_INDEX in track.columns else np.zeros(len(t), np.int64)
    tid = int(track[TRACK_ID].iloc[0])
    moments: list[Moment] = []
    peaks: list[Moment] = []
    for e in NEGATIVE:
        v = probs[:, EMOTIONS.index(e)]
        stretches = sustained_stretches(t, v, params.sustain_threshold, params.sustain_min_s, dt, params.gap_for(dt))
        for i in find_peaks(t, v, params.peak_threshold, params.peak_min_separation_s, params.max_peaks_per_track):
            if any(a <= i <= b for a, b in stretches):
                continue  # inside a sustained stretch of the same emotion: that moment has its max
            peaks.append(Moment("peak", e, t[i], t[i], dt, t[i], int(fi[i]), float(v[i]), float(v[i]), tid, _box(track, i)))
        for a, b in stretches:
            j = a + int(np.argmax(v[a : b + 1]))
            moments.append(
                Moment(
                    "sustained", e, t[a], t[b], t[b] - t[a] + dt, t[j], int(fi[j]),
                    float(v[j]), float(v[a : b + 1].mean()), tid, _box(track, j),
                )
            )
    # the strongest peaks across negative emotions, capped per track
    peaks.sort(key=lambda m: (-m.value, m.time_s))
    moments.extend(peaks[: params.max_peaks_per_track])
    if len(t):
        s = probs[:, EMOTIONS.index("surprise")]
        j = int(np.argmax(s))
        if s[j] >= params.surprise_threshold:
            moments.append(Moment("surprise", "surprise", t[j], t[j], dt, t[j], int(fi[j]), float(s[j]), float(s[j]), tid, _box(track, j)))
    moments.sort(key=lambda m: (m.start_s, m.kind))
    return moments


def track_figures(track: pd.DataFrame, probs: np.ndarray, dt: float, params: MomentParams) -> TrackFigures:
    """Figures of one track; ``track`` sorted by time, ``probs`` aligned (N, 7)."""
    labels = dominant_labels(probs)
    shares = emotion_shares(labels)
    t = track[TIMESTAMP].to_numpy(dtype=np.float64)
    face_time = len(t) * dt
    changes = count_changes(labels, dt, params.min_dwell_s)
    return TrackFigures(
        track_id=int(track[TRACK_ID].iloc[0]),
        first_s=float(t.min()),
        last_s=float(t.max()),
        rows=len(t),
        face_time_s=face_time,
        dominant=top_emotion(shares) or "neutral",
        shares=shares,
        valence=valence_shares(shares),
        changes=changes,
        changes_per_min=changes / (face_time / 60.0) if face_time > 0 else None,
        moments=track_moments(track, probs, dt, params),
    )


def source_figures(
    faces: pd.DataFrame, source: dict[str, Any] | None = None, params: MomentParams | None = None
) -> SourceFigures:
    """Figures of one source from its faces rows and (optionally) its sources-table row."""
    params = params or MomentParams()
    source = dict(source or {})
    faces = faces.sort_values([TRACK_ID, TIMESTAMP, FRAME_INDEX] if FRAME_INDEX in faces.columns else [TRACK_ID, TIMESTAMP], kind="stable")
    sid = str(source.get(SRC_ID) or (faces[SOURCE_ID].iloc[0] if len(faces) else ""))
    path = str(source.get(SRC_PATH) or (faces[SOURCE_PATH].iloc[0] if len(faces) else ""))
    dt = sampling_period(faces[TIMESTAMP]) if len(faces) else 0.0
    probs, smoothed = effective_probs(faces) if len(faces) else (np.zeros((0, 7)), False)
    tracks: list[TrackFigures] = []
    pos = 0
    for _, tr in faces.groupby(TRACK_ID, sort=True):
        n = len(tr)
        tracks.append(track_figures(tr, probs[pos : pos + n], dt, params))
        pos += n
    labels = dominant_labels(probs)
    shares = emotion_shares(labels)
    face_time = len(faces) * dt
    changes = sum(t.changes for t in tracks)
    duration = source.get(SRC_DURATION)
    if duration is None or (isinstance(duration, float) and not np.isfinite(duration)):
        duration = (float(faces[TIMESTAMP].max() - faces[TIMESTAMP].min()) + dt) if len(faces) else None
    status = str(source.get(SRC_STATUS) or "ok")
    error = source.get(SRC_ERROR) if isinstance(source.get(SRC_ERROR), str) and source.get(SRC_ERROR) else None
    if status not in SOURCE_STATUSES:  # the Parquet is untrusted: only known statuses pass
        error = f"the sources table gives an unrecognised status {status[:200]!r}" + (f"; {error}" if error else "")
        status = INVALID_STATUS
    kind = source.get(SRC_KIND)
    return SourceFigures(
        source_id=sid,
        path=path,
        kind=str(kind) if kind is not None else None,
        status=status,
        error=error,
        duration_s=float(duration) if duration is not None else None,
        dt=dt,
        rows=len(faces),
        faces=len(tracks),
        face_time_s=face_time,
        shares=shares,
        valence=valence_shares(shares),
        dominant=top_emotion(shares),
        changes=changes,
        changes_per_min=changes / (face_time / 60.0) if face_time > 0 else None,
        smoothed=smoothed,
        tracks=tracks,
    )


def session_figures(
    faces: pd.DataFrame, sources: pd.DataFrame | None = None, params: MomentParams | None = None
) -> SessionFigures:
    """Figures of every source and of the whole session.

    Sources come from the sources table when given (so failed / skipped inputs and sources
    without faces are listed), plus any source_id seen only in ``faces``. Order: the sources
    table's order, then faces-only sources by path.
    """
    params = params or MomentParams()
    by_id = {sid: g for sid, g in faces.groupby(SOURCE_ID, sort=False)} if len(faces) else {}
    rows: list[dict[str, Any]] = []
    if sources is not None and len(sources):
        rows = [{k: (None if _isna(v) else v) for k, v in r.items()} for r in sources.to_dict("records")]
    known = {r[SRC_ID] for r in rows}
    extra = sorted((sid for sid in by_id if sid not in known), key=lambda s: str(by_id[s][SOURCE_PATH].iloc[0]))
    rows += [{SRC_ID: sid} for sid in extra]
    empty = faces.iloc[0:0]
    figs = [source_figures(by_id.get(r[SRC_ID], empty), r, params) for r in rows]

    # session shares: rows weighted by their source's sampling period (images-only: 1 each)
    use_dt = any(f.dt > 0 and f.rows for f in figs)
    tot = {e: 0.0 for e in EMOTIONS}
    wsum = 0.0
    for f in figs:
        w = f.face_time_s if use_dt else float(f.rows)
        wsum += w
        for e in EMOTIONS:
            tot[e] += f.shares[e] * w
    shares = {e: (tot[e] / wsum if wsum > 0 else 0.0) for e in EMOTIONS}
    face_time = sum(f.face_time_s for f in figs)
    changes = sum(f.changes for f in figs)
    status_counts = {s: 0 for s in ("ok", "partial", "failed", "skipped")}
    for f in figs:
        status_counts[f.status] = status_counts.get(f.status, 0) + 1
    return SessionFigures(
        sources=figs,
        params=params,
        duration_s=float(sum(f.duration_s or 0.0 for f in figs)),
        faces=sum(f.faces for f in figs),
        rows=sum(f.rows for f in figs),
        face_time_s=face_time,
        shares=shares,
        valence=valence_shares(shares),
        dominant=top_emotion(shares),
        changes=changes,
        changes_per_min=changes / (face_time / 60.0) if face_time > 0 else None,
        status_counts=status_counts,
        smoothed=any(f.smoothed for f in figs),
    )


def _isna(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False
