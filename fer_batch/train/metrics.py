"""Metrics of a classifier: hard-label scores (accuracy, macro-F1, confusion) and agreement with
annotators' vote distributions (NLL, calibration error, reliability bins)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fer_batch.types import EMOTIONS


def metrics_from(y_true: np.ndarray, y_pred: np.ndarray, k: int = len(EMOTIONS)) -> dict[str, Any]:
    """Accuracy, macro-F1 over the classes present in ``y_true``, per-class P/R/F1, confusion.

    A prediction of -1 (no face found with ``--detect``) counts as wrong for its true class.
    """
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    valid = y_pred >= 0
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y_true[valid], y_pred[valid]), 1)
    support = np.bincount(y_true, minlength=k)
    tp = np.diag(cm).astype(float)
    prec = np.divide(tp, cm.sum(0), out=np.zeros(k), where=cm.sum(0) > 0)
    rec = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(k), where=(prec + rec) > 0)
    present = support > 0
    return {
        "n": int(len(y_true)),
        "accuracy": float(tp.sum() / max(1, len(y_true))),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "no_prediction": int((~valid).sum()),
        "per_class": {EMOTIONS[i]: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(support[i])} for i in range(k)},
        "labels": list(EMOTIONS),
        "confusion": cm.tolist(),
    }


def vote_metrics(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Agreement with annotators' vote distributions (rows of ``targets`` sum to 1).

    ``nll``: mean cross-entropy of the vote distribution under the model (lower is better; the
    distribution's own entropy is the floor). ``ece``: over ``bins`` equal-width bins of the top
    probability, the weighted mean of |mean top probability - mean share of annotators who chose
    that top label|; a model that outputs exactly the vote distribution has 0. ``reliability``:
    per bin (lower edge, count, mean confidence, mean annotator share).
    """
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    t = np.asarray(targets, np.float64)
    nll = float(-(t * np.log(p)).sum(1).mean())
    top = p.argmax(1)
    conf = p[np.arange(len(p)), top]
    share = t[np.arange(len(t)), top]
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece, rel = 0.0, []
    for b in range(bins):
        m = which == b
        if m.any():
            gap = abs(conf[m].mean() - share[m].mean())
            ece += m.mean() * gap
            rel.append({"bin": round(float(edges[b]), 4), "n": int(m.sum()), "confidence": round(float(conf[m].mean()), 4),
                        "agreement": round(float(share[m].mean()), 4)})
        else:
            rel.append({"bin": round(float(edges[b]), 4), "n": 0, "confidence": None, "agreement": None})
    return {"nll": nll, "ece": float(ece), "reliability": rel}


def probs_metrics(probs: np.ndarray, labels: np.ndarray, targets: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`metrics_from` on the rows with a label (>= 0) for the top class of ``probs``, and with
    ``targets`` (vote distributions, every row) also ``nll`` and ``ece`` of :func:`vote_metrics`."""
    lab = np.asarray(labels) >= 0
    m = metrics_from(np.asarray(labels)[lab], np.asarray(probs)[lab].argmax(1))
    if targets is not None:
        m.update({k: v for k, v in vote_metrics(probs, targets).items() if k != "reliability"})
    return m
