"""Emotion-timeline plots as inline SVG (matplotlib, Agg, no pyplot global state)."""

from __future__ import annotations

import html
import io
import itertools
import re

import matplotlib

matplotlib.use("Agg")  # no display; harmless when already set

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fer_batch.report.figures import Moment  # noqa: E402
from fer_batch.types import EMOTIONS  # noqa: E402

# One colour per emotion, shared by the plots, the dominant band and the HTML share bars.
EMOTION_COLORS: dict[str, str] = {
    "angry": "#d62728",
    "disgust": "#8c6d31",
    "fear": "#9467bd",
    "happy": "#2ca02c",
    "sad": "#1f77b4",
    "surprise": "#ff7f0e",
    "neutral": "#8a8a8a",
}

# Longer tracks are averaged into this many time bins for the probability lines (the SVG
# stays small: about 30 KB per plot); the dominant band always uses every sample.
MAX_PLOT_POINTS = 600

_RC = {
    "svg.fonttype": "none",  # text as <text>, drawn with the viewer's fonts: small, no font files
    "svg.hashsalt": "fer-batch",  # deterministic ids
    "font.size": 8,
    "font.family": "sans-serif",
    "path.simplify": True,
}

_uid = itertools.count()


def _compact(svg: str, prefix: str) -> str:
    """Shrink one matplotlib SVG for inlining (about 3x smaller) and make its ids unique inside
    an HTML page holding many SVGs: drop ids nothing refers to, prefix the others, round
    coordinates to 0.1 pt, fold line breaks."""
    refs = set(re.findall(r"url\(#([^)]+)\)", svg)) | set(re.findall(r'href="#([^"]+)"', svg))

    def _id(m: re.Match) -> str:
        return f' id="{prefix}{m.group(1)}"' if m.group(1) in refs else ""

    svg = re.sub(r'\s+id="([^"]+)"', _id, svg)
    svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})", svg)
    svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"', svg)
    svg = re.sub(r"(\d\.\d)\d+", r"\1", svg)
    svg = re.sub(r"<g>\s*</g>", "", svg)
    svg = re.sub(r"font-family: [^;\"]*;?\s*", "", svg)  # the page's CSS sets the font once
    svg = re.sub(r' transform="rotate\(-0 [^)]*\)"', "", svg)
    svg = re.sub(r"\s*\n\s*", " ", svg)
    # "M x y L x y L x y" == "M x y x y x y" (implicit lineto) where the path has no curves
    return re.sub(r'd="([^"]*)"', lambda m: 'd="' + (m.group(1) if re.search("[CQcq]", m.group(1)) else m.group(1).replace(" L ", " ")) + '"', svg)


def figure_to_svg(fig: Figure) -> str:
    """A matplotlib figure as an SVG element ready to inline in HTML (no XML prolog)."""
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    return _presentation_attrs(_compact(svg, f"f{next(_uid)}-"))


def _presentation_attrs(svg: str) -> str:
    """Move matplotlib's inline CSS into SVG presentation attributes, so the page's
    Content-Security-Policy needs no ``'unsafe-inline'`` styles: every ``style="k: v; ..."``
    becomes ``k="v" ...`` (matplotlib only writes properties that exist as presentation
    attributes: fill, stroke*, font-size, text-anchor, opacity), and its ``<style>`` element
    (``*{stroke-linejoin: round; stroke-linecap: butt}``) becomes the same two attributes on
    the root ``<svg>``, inherited by every shape that does not set its own."""
    svg = re.sub(r"<style[^>]*>.*?</style>", "", svg, flags=re.S)
    svg = re.sub(r"<defs>\s*</defs>", "", svg)

    def _attrs(m: re.Match) -> str:
        out = []
        for decl in m.group(1).split(";"):
            k, sep, v = decl.partition(":")
            k, v = k.strip(), v.strip()
            if sep and re.fullmatch(r"[a-z-]+", k):
                out.append(f'{k}="{html.escape(v)}"')
        return " ".join(out)

    svg = re.sub(r'style="([^"]*)"', _attrs, svg)
    return svg.replace("<svg ", '<svg stroke-linejoin="round" stroke-linecap="butt" ', 1)


def _bin(times: np.ndarray, probs: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Average samples into at most ``max_points`` equal time bins (empty bins dropped)."""
    if len(times) <= max_points:
        return times, probs
    edges = np.linspace(times.min(), times.max(), max_points + 1)
    idx = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, max_points - 1)
    counts = np.bincount(idx, minlength=max_points)
    keep = counts > 0
    t = np.bincount(idx, weights=times, minlength=max_points)[keep] / counts[keep]
    p = np.stack([np.bincount(idx, weights=probs[:, j], minlength=max_points)[keep] for j in range(probs.shape[1])], 1)
    return t, p / counts[keep][:, None]


def _break_gaps(times: np.ndarray, probs: np.ndarray, max_gap: float) -> tuple[np.ndarray, np.ndarray]:
    """Insert NaN rows where consecutive samples are further apart than ``max_gap``, so lines
    do not bridge the time a face was not seen."""
    if len(times) < 2 or not np.isfinite(max_gap):
        return times, probs
    cut = np.flatnonzero(np.diff(times) > max_gap)
    if not len(cut):
        return times, probs
    t = np.insert(times, cut + 1, (times[cut] + times[cut + 1]) / 2)
    p = np.insert(probs, cut + 1, np.nan, axis=0)
    return t, p


def band_segments(times: np.ndarray, labels: np.ndarray, dt: float, max_gap: float) -> dict[str, list[tuple[float, float]]]:
    """(start, width) bars of the dominant-emotion band per emotion: consecutive samples with
    the same label and no gap above ``max_gap`` merge; each sample covers ``dt``."""
    w = dt if dt > 0 else 1.0
    out: dict[str, list[tuple[float, float]]] = {e: [] for e in EMOTIONS}
    start = None
    for i, (t, lab) in enumerate(zip(times, labels)):
        if start is None:
            start, cur = t, lab
        elif lab != cur or t - times[i - 1] > max_gap:
            out[cur].append((start, times[i - 1] + w - start))
            start, cur = t, lab
    if start is not None:
        out[cur].append((start, times[-1] + w - start))
    return out


class TimelinePlotter:
    """Draws emotion timelines into one reused matplotlib figure (building the axes, ticks and
    legend once per report instead of once per face: about 2x faster). Not thread-safe: one
    per thread."""

    def __init__(self) -> None:
        with matplotlib.rc_context(_RC):
            self.fig = fig = Figure(figsize=(9.0, 2.7), dpi=72)
            gs = fig.add_gridspec(2, 1, height_ratios=[5, 1], hspace=0.08, left=0.06, right=0.86, top=0.95, bottom=0.16)
            self.ax = ax = fig.add_subplot(gs[0])
            self.band = band = fig.add_subplot(gs[1], sharex=ax)
            self.lines = [
                ax.plot([], [], color=EMOTION_COLORS[e], lw=1.3 if e != "neutral" else 1.0, label=e)[0] for e in EMOTIONS
            ]
            ax.set_ylim(0, 1.02)
            ax.grid(True, axis="y", lw=0.4, alpha=0.5)
            ax.tick_params(labelbottom=False)
            ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, fontsize=7, handlelength=1.5)
            band.set_yticks([])
            band.set_ylim(0, 1)
            band.set_ylabel("dominant", rotation=0, ha="right", va="center", fontsize=7)
            band.set_xlabel("time (s)")
        self._transient: list = []

    def svg(
        self,
        times: np.ndarray,
        probs: np.ndarray,
        labels: np.ndarray,
        dt: float,
        max_gap: float,
        moments: list[Moment] = (),
        smoothed: bool = False,
        xlim: tuple[float, float] | None = None,
    ) -> str:
        """The emotion timeline of one track: the 7 probabilities over time (``probs``, (N, 7)
        in EMOTIONS order), key moments marked, the dominant-emotion band below. Inline SVG."""
        times = np.asarray(times, np.float64)
        probs = np.asarray(probs, np.float64)
        ax, band = self.ax, self.band
        with matplotlib.rc_context(_RC):
            for a in self._transient:
                a.remove()
            self._transient = []
            t, p = _bin(times, probs, MAX_PLOT_POINTS)
            t, p = _break_gaps(t, p, max_gap if len(t) == len(times) else max(max_gap, (t[-1] - t[0]) / MAX_PLOT_POINTS * 2.5))
            for j, line in enumerate(self.lines):
                line.set_data(t, p[:, j])
            for m in moments:
                c = EMOTION_COLORS[m.emotion]
                if m.kind == "sustained":
                    self._transient.append(ax.axvspan(m.start_s, m.start_s + m.duration_s, color=c, alpha=0.12, lw=0))
                else:
                    self._transient.append(ax.axvline(m.time_s, color=c, lw=0.8, ls="--", alpha=0.8))
                    self._transient += ax.plot([m.time_s], [m.value], marker="v", color=c, ms=5)
            for e, segs in band_segments(times, labels, dt, max_gap).items():
                if segs:
                    self._transient.append(band.broken_barh(segs, (0, 1), facecolors=EMOTION_COLORS[e], lw=0))
            ax.set_ylabel("probability" + (" (smoothed)" if smoothed else ""))
            if xlim is None and len(times):
                w = dt if dt > 0 else 1.0
                xlim = (float(times.min()), float(times.max()) + w)
            if xlim is not None:
                ax.set_xlim(*xlim)
            return figure_to_svg(self.fig)


def timeline_svg(times, probs, labels, dt, max_gap, moments=(), smoothed=False, xlim=None) -> str:
    """One timeline with a fresh figure (see :meth:`TimelinePlotter.svg`)."""
    return TimelinePlotter().svg(times, probs, labels, dt, max_gap, moments, smoothed, xlim)
