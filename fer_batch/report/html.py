"""The self-contained HTML review report.

Layout (one file, no network at view time: a Content-Security-Policy of ``default-src 'none'``
forbids any request; plots are inline SVG, thumbnails ``data:`` URIs, the script and styles
inline):

Every value read from Parquet (paths, statuses, errors, metadata) is untrusted: it is
HTML-escaped wherever it is written, statuses outside ``SOURCE_STATUSES`` are shown as
``invalid``, and the CSP allows only the page's own script and stylesheet, by their sha256
(no ``'unsafe-inline'``: an injected ``<script>``, event handler or ``<style>`` would not run).
Sizes and colours are therefore SVG attributes and CSS classes, never ``style=`` attributes.

- **Index view** (``#index``, the default): the session summary, then a table of every
  source (sortable by any column, filterable by text and status, paged ``per_page`` rows at a
  time) whose rows link to the sources, then the definitions and thresholds used.
- **Source views** (``#src-...``): one per source, shown one at a time (the others stay
  ``hidden``, so a report of hundreds of sources is never one endless page): its figures,
  and per face (track) the emotion timeline, the share of time per emotion, and its key
  moments (with thumbnails when asked for). Without JavaScript the links still work
  through CSS ``:target``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from fer_batch.report.columns import SOURCE_ID, TIMESTAMP, TRACK_ID
from fer_batch.report.figures import (
    NEGATIVE,
    Moment,
    MomentParams,
    SessionFigures,
    SourceFigures,
    TrackFigures,
    dominant_labels,
    effective_probs,
)
from fer_batch.report.plots import EMOTION_COLORS, TimelinePlotter
from fer_batch.types import EMOTIONS

# Faces of one source that get a full timeline plot (the longest first); the others are
# listed with their figures only. Keeps a crowded scene's page readable and small.
MAX_PLOTTED_TRACKS = 12
# Thumbnails per source at most (the strongest moments first).
MAX_THUMBS_PER_SOURCE = 40

e = html.escape


def fmt_time(s: float | None) -> str:
    """Seconds as ``12.5 s``, ``1:02.5`` or ``1:02:03``."""
    if s is None or not np.isfinite(s):
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(s, 60)
    if m < 60:
        return f"{int(m)}:{sec:04.1f}"
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{int(sec):02d}"


def fmt_pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def fmt_num(v: float | None, nd: int = 1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _dv(v: Any) -> str:
    """A ``data-v`` sort value ('' sorts last)."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    return e(str(v))


def share_bar(shares: dict[str, float], cls: str = "bar") -> str:
    """The share of time per emotion as a stacked bar (an SVG of rectangles sized by
    attributes, so no inline style is needed; with a text alternative)."""
    parts = []
    x = 0.0
    for em in EMOTIONS:
        v = float(shares.get(em, 0.0))
        if v > 0:
            parts.append(
                f'<rect x="{100 * x:.3f}" y="0" width="{100 * v:.3f}" height="1" fill="{EMOTION_COLORS[em]}">'
                f"<title>{em} {100 * v:.1f}%</title></rect>"
            )
            x += v
    alt = ", ".join(f"{em} {100 * shares.get(em, 0):.0f}%" for em in EMOTIONS if shares.get(em, 0) > 0)
    svg = f'<svg viewBox="0 0 100 1" preserveAspectRatio="none" aria-hidden="true">{"".join(parts)}</svg>' if parts else ""
    return f'<div class="{cls}" role="img" aria-label="{e(alt or "no faces")}">{svg}</div>'


def share_legend(shares: dict[str, float]) -> str:
    """The legend of a share bar: the emotions with a non-zero share and their percentage."""
    items = "".join(
        f'<li><i class="c-{em}"></i>{em} <b>{100 * shares.get(em, 0):.1f}%</b></li>'
        for em in EMOTIONS
        if shares.get(em, 0) > 0
    )
    return f'<ul class="legend">{items}</ul>'


def _card(label: str, value: str, hint: str = "") -> str:
    t = f' title="{e(hint)}"' if hint else ""
    return f'<div class="card"{t}><div class="k">{e(label)}</div><div class="v">{value}</div></div>'


def _valence_cards(valence: dict[str, float]) -> str:
    return "".join(
        [
            _card("Positive", fmt_pct(valence["positive"]), "happy"),
            _card("Negative", fmt_pct(valence["negative"]), "angry, disgust, fear, sad"),
            _card("Neutral", fmt_pct(valence["neutral"])),
            _card("Surprise", fmt_pct(valence["surprise"]), "kept apart: its valence is ambiguous"),
        ]
    )


def section_id(source_id: str, used: set[str]) -> str:
    base = "src-" + (re.sub(r"[^A-Za-z0-9_-]", "_", source_id) or "x")
    sid, k = base, 1
    while sid in used:
        k += 1
        sid = f"{base}-{k}"
    used.add(sid)
    return sid


# ------------------------------------------------------------------------- source view


def _moment_rows(moments: list[Moment], thumbs: dict[int, str], with_thumbs: bool) -> str:
    if not moments:
        return '<p class="muted">No key moments at the current thresholds.</p>'
    head = "<tr><th>Kind</th><th>Emotion</th><th>Start</th><th>End</th><th>Duration</th><th>Max</th><th>Mean</th>"
    head += "<th>Face</th></tr>" if with_thumbs else "</tr>"
    rows = []
    for m in moments:
        kind = {"peak": "peak", "sustained": "sustained", "surprise": "strongest surprise"}[m.kind]
        th = ""
        if with_thumbs:
            uri = thumbs.get(id(m))
            th = f'<td><img class="thumb" alt="face {m.track_id} at {m.time_s:.1f} s" src="{uri}"></td>' if uri else '<td class="muted">–</td>'
        cls = "neg" if m.emotion in NEGATIVE else "sur"
        rows.append(
            f'<tr class="{cls}"><td>{kind}</td><td><i class="dot c-{m.emotion}"></i>{m.emotion}</td>'
            f"<td>{fmt_time(m.start_s)}</td><td>{fmt_time(m.end_s)}</td><td>{fmt_time(m.duration_s)}</td>"
            f"<td>{m.value:.2f}</td><td>{m.mean:.2f}</td>{th}</tr>"
        )
    return f'<table class="moments"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _track_block(
    tf: TrackFigures, track_df: pd.DataFrame, sf: SourceFigures, sec: str, params: MomentParams,
    thumbs: dict[int, str], with_thumbs: bool, plotter: TimelinePlotter | None, xlim: tuple[float, float] | None,
) -> str:
    if sf.dt > 0:
        title = (
            f"Face {tf.track_id} <span class=\"muted\">· {fmt_time(tf.first_s)} – {fmt_time(tf.last_s)}"
            f" · {tf.rows} sample{'s' if tf.rows != 1 else ''} · mostly {e(tf.dominant)}"
            f" · {fmt_num(tf.changes_per_min)} changes/min</span>"
        )
        body = [f"<h3>{title}</h3>", share_bar(tf.shares), share_legend(tf.shares)]
    else:  # a single image: the face's probabilities say more than a share of one sample
        probs, _ = effective_probs(track_df)
        mean = dict(zip(EMOTIONS, probs.mean(axis=0).tolist()))
        body = [
            f'<h3>Face {tf.track_id} <span class="muted">· {e(tf.dominant)} · probabilities</span></h3>',
            share_bar(mean), share_legend(mean),
        ]
    if plotter is not None:
        probs, smoothed = effective_probs(track_df)
        body.append(
            '<div class="plot">'
            + plotter.svg(
                track_df[TIMESTAMP].to_numpy(), probs, dominant_labels(probs), sf.dt, params.gap_for(sf.dt),
                tf.moments, smoothed, xlim,
            )
            + "</div>"
        )
    body.append(_moment_rows(tf.moments, thumbs, with_thumbs))
    return f'<article class="track" id="{sec}-t{tf.track_id}">{"".join(body)}</article>'


def source_section(
    sf: SourceFigures, faces: pd.DataFrame, sec: str, params: MomentParams, nav: str,
    thumbs: dict[int, str], thumb_note: str | None, with_thumbs: bool, plotter: TimelinePlotter,
) -> str:
    """The HTML of one source view."""
    name = Path(sf.path).name or sf.path
    status = f'<span class="status s-{e(sf.status)}">{e(sf.status)}</span>'
    out = [
        f'<section class="source" id="{sec}" hidden>',
        nav,
        f'<h2>{e(name)} {status}</h2>',
        f'<p class="path">{e(sf.path)}{" · " + e(sf.kind) if sf.kind else ""}</p>',
    ]
    if sf.error:
        out.append(f'<p class="error">{e(sf.error)}</p>')
    if thumb_note:
        out.append(f'<p class="note">{e(thumb_note)}</p>')
    if not sf.rows and sf.status in ("failed", "skipped"):
        out.append(f'<p class="muted">This input was not processed ({e(sf.status)}).</p>')
        out.append(nav)
        out.append("</section>")
        return "\n".join(out)
    timed = sf.dt > 0 or not sf.rows
    out.append('<div class="cards">')
    if timed:
        out.append(_card("Duration", fmt_time(sf.duration_s)))
    out.append(_card("Faces", str(sf.faces), "tracks: one per face followed over time"))
    if timed:
        out.append(_card("Face time", fmt_time(sf.face_time_s), "sum over faces of the time each was seen"))
    if sf.rows:
        out.append(_valence_cards(sf.valence))
    if timed:
        hint = f"dominant-emotion changes lasting >= {params.min_dwell_s:g} s, per face-minute"
        out.append(_card("Changes / min", fmt_num(sf.changes_per_min), hint))
    out.append(_card("Key moments", str(len(sf.moments))))
    if sf.rows:
        out.append(_card("Sampling", f"every {sf.dt:.2f} s" if sf.dt > 0 else "single frame"))
    out.append("</div>")
    if sf.rows:
        out.append(share_bar(sf.shares, "bar big") + share_legend(sf.shares))
    if not sf.tracks:
        out.append('<p class="muted">No faces were found in this source.</p>')
    by_track = {int(k): g for k, g in faces.groupby(TRACK_ID, sort=False)} if len(faces) else {}
    ordered = sorted(sf.tracks, key=lambda t: (-t.rows, t.track_id))
    plotted = {t.track_id for t in ordered[:MAX_PLOTTED_TRACKS]} if sf.dt > 0 else set()
    span = None
    if len(faces) and sf.dt > 0:
        span = (float(faces[TIMESTAMP].min()), float(faces[TIMESTAMP].max()) + sf.dt)
    for tf in sorted(ordered[:MAX_PLOTTED_TRACKS], key=lambda t: t.first_s):
        tdf = by_track[tf.track_id].sort_values(TIMESTAMP, kind="stable")
        plot = plotter if tf.track_id in plotted else None
        out.append(_track_block(tf, tdf, sf, sec, params, thumbs, with_thumbs, plot, span))
    rest = ordered[MAX_PLOTTED_TRACKS:]
    if rest:
        out.append(f"<h3>{len(rest)} more faces (shorter tracks, figures only)</h3>")
        rows = "".join(
            f"<tr><td>{t.track_id}</td><td>{fmt_time(t.first_s)}</td><td>{fmt_time(t.last_s)}</td><td>{t.rows}</td>"
            f"<td>{e(t.dominant)}</td><td>{share_bar(t.shares, 'bar mini')}</td><td>{len(t.moments)}</td></tr>"
            for t in sorted(rest, key=lambda t: t.first_s)
        )
        out.append(
            '<table class="moments"><thead><tr><th>Face</th><th>First</th><th>Last</th><th>Samples</th>'
            f"<th>Dominant</th><th>Emotions</th><th>Key moments</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    out.append(nav)
    out.append("</section>")
    return "\n".join(out)


# ------------------------------------------------------------------------- index view

_COLUMNS: list[tuple[str, str]] = [
    ("Source", "text"), ("Status", "text"), ("Duration", "num"), ("Faces", "num"), ("Emotions", "none"),
    ("Positive", "num"), ("Negative", "num"), ("Neutral", "num"), ("Surprise", "num"), ("Dominant", "text"),
    ("Changes/min", "num"), ("Key moments", "num"), ("Top negative", "text"),
]


def _index_row(sf: SourceFigures, sec: str) -> str:
    r = sf.summary_row()
    name = Path(sf.path).name or sf.path
    search = " ".join(str(x) for x in (sf.path, sf.status, sf.dominant or "", r["top_negative"] or "", sf.error or "")).lower()
    cells = [
        f'<td data-v="{e(name.lower())}"><a href="#{sec}" title="{e(sf.path)}">{e(name)}</a></td>',
        f'<td data-v="{e(sf.status)}"><span class="status s-{e(sf.status)}" title="{e(sf.error or "")}">{e(sf.status)}</span></td>',
        f'<td data-v="{_dv(sf.duration_s)}">{fmt_time(sf.duration_s)}</td>',
        f'<td data-v="{sf.faces}">{sf.faces}</td>',
        f"<td>{share_bar(sf.shares, 'bar mini')}</td>",
        *[
            f'<td data-v="{_dv(sf.valence[g]) if sf.rows else ""}">{fmt_pct(sf.valence[g]) if sf.rows else "–"}</td>'
            for g in ("positive", "negative", "neutral", "surprise")
        ],
        f'<td data-v="{e(sf.dominant or "")}">{e(sf.dominant or "–")}</td>',
        f'<td data-v="{_dv(sf.changes_per_min)}">{fmt_num(sf.changes_per_min)}</td>',
        f'<td data-v="{len(sf.moments)}">{len(sf.moments)}</td>',
        f'<td data-v="{e(r["top_negative"] or "")}">{e(r["top_negative"] or "–")}</td>',
    ]
    return f'<tr data-status="{e(sf.status)}" data-search="{e(search)}">{"".join(cells)}</tr>'


def _definitions(params: MomentParams) -> str:
    p = params
    return f"""
<details id="about"><summary>How to read this report (definitions and thresholds)</summary>
<ul>
<li><b>Probabilities</b>: the classifier's 7 emotion probabilities per face per sampled frame
(the smoothed ones where the run used <code>--smooth</code>). The <b>dominant emotion</b> of a sample is the most probable one;
the coloured band under each plot shows it over time.</li>
<li><b>Share of time</b>: every sample stands for one sampling period of that face's time. Positive = happy; negative =
angry, disgust, fear, sad; neutral = neutral; surprise is counted apart (its valence is ambiguous).</li>
<li><b>Changes per minute</b>: changes of the dominant emotion along each face, ignoring states shorter than
{p.min_dwell_s:g} s, per minute of face time.</li>
<li><b>Peak</b>: a local maximum of a negative emotion with probability &ge; {p.peak_threshold:g}; peaks closer than
{p.peak_min_separation_s:g} s keep the higher; at most {p.max_peaks_per_track} per face; peaks inside a sustained
stretch of the same emotion are part of that stretch.</li>
<li><b>Sustained</b>: consecutive samples with one negative emotion &ge; {p.sustain_threshold:g} lasting at least
{p.sustain_min_s:g} s (a gap over {"2.5 sampling periods" if p.max_gap_s is None else f"{p.max_gap_s:g} s"} ends it).</li>
<li><b>Strongest surprise</b>: each face's highest surprise probability, shown when &ge; {p.surprise_threshold:g}.</li>
<li>Higher thresholds report fewer, clearer moments and can miss mild ones; lower thresholds catch more and include
classifier noise. Change them with <code>fer-batch report --help</code>.</li>
</ul></details>"""


_CSS = """
:root{--fg:#1d2125;--muted:#6b7280;--line:#e3e6ea;--bg:#fff;--accent:#2456a6}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:var(--fg);background:#f6f7f9}
header{background:#1f2933;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#cbd2d9;font-size:12px}
main{max-width:1320px;margin:0 auto;padding:16px 24px 48px}
h2{font-size:18px;margin:18px 0 8px}
h3{font-size:15px;margin:14px 0 6px}
a{color:var(--accent)}
.muted{color:var(--muted);font-weight:normal}
.path{color:var(--muted);word-break:break-all;margin:0 0 8px}
.error{background:#fdecea;border:1px solid #f5c2bd;padding:6px 10px;border-radius:4px}
.note{background:#fff7e0;border:1px solid #f3dd9b;padding:6px 10px;border-radius:4px}
.cards{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0 12px}
.card{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:6px 12px;min-width:96px}
.card .k{font-size:11px;color:var(--muted);text-transform:uppercase;letter-spacing:.03em}
.card .v{font-size:18px;font-weight:600}
.bar{display:flex;height:12px;border-radius:3px;overflow:hidden;background:#eceff3;margin:4px 0}
.bar svg{display:block;width:100%;height:100%}
.bar.big{height:18px}
.bar.mini{height:10px;width:120px;margin:0}
.legend{list-style:none;padding:0;margin:2px 0 8px;display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px}
.legend i,.dot{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:-1px}
.track{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:4px 14px 10px;margin:12px 0}
.plot svg{width:100%;height:auto;display:block}
.plot svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
table{border-collapse:collapse;background:var(--bg);font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:middle}
.tablewrap{overflow-x:auto}
#src-table{width:100%}
#src-table th{cursor:pointer;user-select:none;white-space:nowrap;background:#eef1f5;position:sticky;top:0}
#src-table th[data-type=none]{cursor:default}
#src-table th[aria-sort=ascending]::after{content:" \\25B2";font-size:10px}
#src-table th[aria-sort=descending]::after{content:" \\25BC";font-size:10px}
table.moments{margin:6px 0}
tr.neg td:first-child{border-left:3px solid #d62728}
tr.sur td:first-child{border-left:3px solid #ff7f0e}
.thumb{width:64px;height:auto;border-radius:3px;display:block}
.status{font-size:11px;padding:1px 6px;border-radius:8px;background:#e5e7eb}
.s-ok{background:#dcf3e2;color:#1e6b34}.s-partial{background:#fff0c2;color:#7a5b00}
.s-failed{background:#fbd9d5;color:#8f1d12}.s-skipped{background:#e5e7eb;color:#4b5563}
.controls{display:flex;gap:10px;align-items:center;margin:6px 0;flex-wrap:wrap}
.controls input{padding:5px 8px;min-width:260px;border:1px solid #c9ced6;border-radius:4px}
.controls select{padding:4px}
.pager button{margin:0 2px;padding:3px 9px}
.srcnav{display:flex;gap:16px;font-size:13px;margin:6px 0}
section.source:target{display:block}
details#about{margin-top:24px;background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:8px 14px}
details#about summary{cursor:pointer;font-weight:600}
.s-invalid{background:#fbd9d5;color:#8f1d12}
""" + "".join(f".c-{em}{{background:{col}}}\n" for em, col in EMOTION_COLORS.items())

_JS = r"""
(function () {
  "use strict";
  var index = document.getElementById("index");
  var sections = Array.prototype.slice.call(document.querySelectorAll("section.source"));
  function route() {
    var id = decodeURIComponent(location.hash.slice(1));
    var target = id ? document.getElementById(id) : null;
    var sec = target && target.closest ? target.closest("section.source") : null;
    sections.forEach(function (s) { s.hidden = s !== sec; });
    index.hidden = !!sec;
    if (sec) {
      document.title = sec.getAttribute("data-title") + " \u2013 " + document.body.getAttribute("data-title");
      if (target === sec) window.scrollTo(0, 0); else target.scrollIntoView();
    } else {
      document.title = document.body.getAttribute("data-title");
    }
  }
  window.addEventListener("hashchange", route);

  var table = document.getElementById("src-table");
  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var perPage = parseInt(table.getAttribute("data-per-page"), 10) || 50;
  var page = 0, visible = rows;
  var filterBox = document.getElementById("filter");
  var statusBox = document.getElementById("status-filter");
  var info = document.getElementById("count");
  var pager = document.getElementById("pager");

  function cellValue(row, col, type) {
    var c = row.cells[col];
    var v = c.hasAttribute("data-v") ? c.getAttribute("data-v") : c.textContent;
    if (type === "num") { return v === "" ? null : parseFloat(v); }
    return v === "" ? null : v.toLowerCase();
  }
  function render() {
    var pages = Math.max(1, Math.ceil(visible.length / perPage));
    if (page >= pages) page = pages - 1;
    var lo = page * perPage, hi = Math.min(visible.length, lo + perPage);
    var frag = document.createDocumentFragment();
    for (var i = lo; i < hi; i++) frag.appendChild(visible[i]);
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    tbody.appendChild(frag);
    info.textContent = visible.length
      ? "Showing " + (lo + 1) + "\u2013" + hi + " of " + visible.length + (visible.length !== rows.length ? " (filtered from " + rows.length + ")" : "")
      : "No source matches the filter (" + rows.length + " in total)";
    pager.innerHTML = "";
    if (pages > 1) {
      var prev = document.createElement("button"), next = document.createElement("button");
      prev.textContent = "\u2039 Prev"; next.textContent = "Next \u203A";
      prev.disabled = page === 0; next.disabled = page === pages - 1;
      prev.onclick = function () { page--; render(); };
      next.onclick = function () { page++; render(); };
      var lab = document.createElement("span");
      lab.textContent = " Page " + (page + 1) + " of " + pages + " ";
      pager.appendChild(prev); pager.appendChild(lab); pager.appendChild(next);
    }
  }
  function applyFilter() {
    var q = filterBox.value.trim().toLowerCase(), st = statusBox.value;
    var terms = q ? q.split(/\s+/) : [];
    visible = rows.filter(function (r) {
      if (st && r.getAttribute("data-status") !== st) return false;
      var hay = r.getAttribute("data-search");
      return terms.every(function (t) { return hay.indexOf(t) >= 0; });
    });
    page = 0;
    render();
  }
  var sortCol = -1, sortDir = 1;
  function sortBy(col, type) {
    sortDir = col === sortCol ? -sortDir : 1;
    sortCol = col;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      if (i === col) th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
    var keyed = rows.map(function (r, i) { return [cellValue(r, col, type), i, r]; });
    keyed.sort(function (a, b) {
      if (a[0] === null && b[0] === null) return a[1] - b[1];
      if (a[0] === null) return 1;
      if (b[0] === null) return -1;
      if (a[0] < b[0]) return -sortDir;
      if (a[0] > b[0]) return sortDir;
      return a[1] - b[1];
    });
    rows = keyed.map(function (k) { return k[2]; });
    applyFilter();
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
    var type = th.getAttribute("data-type");
    if (type === "none") return;
    th.addEventListener("click", function () { sortBy(i, type); });
  });
  filterBox.addEventListener("input", applyFilter);
  statusBox.addEventListener("change", applyFilter);
  applyFilter();
  route();
  document.documentElement.setAttribute("data-ready", "1");
})();
"""


def render_html(
    figs: SessionFigures,
    faces: pd.DataFrame,
    *,
    title: str,
    subtitle: str,
    per_page: int = 50,
    thumbs_for: Callable[[SourceFigures, list[Moment]], tuple[dict[int, str], str | None]] | None = None,
) -> str:
    """The whole report as one HTML string.

    Args:
        figs: the figures of the session (see :func:`fer_batch.report.figures.session_figures`).
        faces: the faces rows (needed for the plots).
        title / subtitle: page heading.
        per_page: rows of the sources table per page.
        thumbs_for: when given (``--thumbnails``), called per source with the moments that want
            a thumbnail; returns thumbnail URIs keyed by ``id(moment)`` and an optional note.
    """
    by_src = {sid: g for sid, g in faces.groupby(SOURCE_ID, sort=False)} if len(faces) else {}
    empty = faces.iloc[0:0]
    plotter = TimelinePlotter()
    used: set[str] = set()
    secs = [section_id(s.source_id, used) for s in figs.sources]
    sections = []
    for k, (sf, sec) in enumerate(zip(figs.sources, secs)):
        prev_l = f'<a href="#{secs[k - 1]}">&lsaquo; previous source</a>' if k > 0 else "<span></span>"
        next_l = f'<a href="#{secs[k + 1]}">next source &rsaquo;</a>' if k + 1 < len(secs) else "<span></span>"
        nav = f'<nav class="srcnav"><a href="#index">&uarr; all sources</a>{prev_l}{next_l}<span class="muted">source {k + 1} of {len(secs)}</span></nav>'
        thumbs: dict[int, str] = {}
        note = None
        if thumbs_for is not None and sf.rows:
            want = sorted((m for m in sf.moments if m.box is not None), key=lambda m: -m.value)[:MAX_THUMBS_PER_SOURCE]
            thumbs, note = thumbs_for(sf, want)
        sections.append(
            source_section(
                sf, by_src.get(sf.source_id, empty), sec, figs.params, nav, thumbs, note, thumbs_for is not None, plotter
            )
            .replace("<section ", f'<section data-title="{e(Path(sf.path).name or sf.path)}" ', 1)
        )

    s = figs.summary()
    status_txt = ", ".join(f"{v} {k}" for k, v in figs.status_counts.items() if v)
    cards = "".join(
        [
            _card("Sources", str(len(figs.sources)), status_txt),
            _card("Duration", fmt_time(figs.duration_s), "sum of source durations"),
            _card("Faces", str(figs.faces), "tracks over all sources"),
            _card("Face time", fmt_time(figs.face_time_s)),
            _valence_cards(figs.valence),
            _card("Changes / min", fmt_num(figs.changes_per_min), "dominant-emotion changes per face-minute"),
            _card("Key moments", str(s["key_moments"])),
        ]
    )
    head_cells = "".join(f'<th data-type="{t}" scope="col">{e(n)}</th>' for n, t in _COLUMNS)
    body_rows = "\n".join(_index_row(sf, sec) for sf, sec in zip(figs.sources, secs))
    status_opts = "".join(f'<option value="{e(k)}">{e(k)} ({int(v)})</option>' for k, v in figs.status_counts.items() if v)
    csp = (
        f"default-src 'none'; img-src data:; style-src {_csp_hash(_CSS)}; script-src {_csp_hash(_JS)}; "
        "base-uri 'none'; form-action 'none'"
    )
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="fer-batch report">
<title>{e(title)}</title>
<style>{_CSS}</style></head>
<body data-title="{e(title)}">
<header><h1>{e(title)}</h1><p>{e(subtitle)} · generated {generated}</p></header>
<main>
<noscript><p class="note">Sorting, filtering and paging need JavaScript; the source links work without it.</p></noscript>
<section id="index">
<h2>Session summary</h2>
<div class="cards">{cards}</div>
{share_bar(figs.shares, "bar big") if figs.rows else ""}{share_legend(figs.shares) if figs.rows else ""}
<h2>Sources</h2>
<div class="controls"><input id="filter" type="search" placeholder="Filter: name, status, emotion…" aria-label="filter sources">
<select id="status-filter" aria-label="status"><option value="">any status</option>{status_opts}</select>
<span id="count" class="muted"></span><span id="pager" class="pager"></span></div>
<div class="tablewrap"><table id="src-table" data-per-page="{int(per_page)}"><thead><tr>{head_cells}</tr></thead><tbody>
{body_rows}
</tbody></table></div>
{_definitions(figs.params)}
</section>
{"".join(sections)}
</main>
<script type="application/json" id="report-data">{_json_for_script(figs.summary())}</script>
<script>{_JS}</script>
</body></html>
"""


def _csp_hash(text: str) -> str:
    """The CSP source expression allowing exactly the inline element whose content is ``text``."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _json_for_script(obj: Any) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(obj, default=str).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
