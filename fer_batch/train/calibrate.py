"""Temperature scaling against annotators' vote distributions (``fer-batch calibrate``).

Users read ``p_happy = 0.7`` as "about 70% of people would call this face happy". One scalar
temperature ``T`` (the model's log-probabilities divided by ``T``, then renormalised) is fitted
to minimise the negative log-likelihood of held-out vote distributions (e.g. FER+ PublicTest);
it never changes which emotion is on top, so accuracy is untouched. The card stores it and
:class:`fer_batch.classify.EmotionClassifier` applies it wherever the model runs.
"""

from __future__ import annotations

import logging

import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fer_batch.errors import DataError, ModelError
from fer_batch.train.engine import vote_metrics

log = logging.getLogger(__name__)


def fit_temperature(probs: np.ndarray, targets: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """The T in [lo, hi] minimising the vote NLL of ``softmax(log(probs) / T)``."""
    from scipy.optimize import minimize_scalar

    from fer_batch.classify import apply_temperature

    if len(probs) == 0:
        raise DataError("calibration needs at least one row with votes")

    def nll(log_t: float) -> float:
        return vote_metrics(apply_temperature(probs, float(np.exp(log_t))), targets)["nll"]

    r = minimize_scalar(nll, bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(r.x))


def portable(text: str) -> str:
    """Drop machine-specific directories from a recorded command: absolute paths keep their last two parts."""
    out = []
    for tok in shlex.split(text):
        if tok.startswith("/") and len(Path(tok).parts) > 3:
            tok = "/".join(Path(tok).parts[-2:])
        out.append(tok)
    return shlex.join(out)


def calibrate(model: str, data: str, where: str | None = None, models_dir: str | None = None, threads: int = 0,
              write: bool = True) -> dict[str, Any]:
    """Fit the temperature of ``model`` (a registered name or card) on vote data; write it into its card."""
    from fer_batch.train.data import load_dataset
    from fer_batch.train.evaluate import open_classifier

    clf = open_classifier(model, None, 256, threads, "cpu", models_dir, calibrated=False)
    if str(model).endswith(".pt"):
        raise ModelError("calibrate works on an exported model with a card (fer-batch export first)")
    ds = load_dataset(data, clf.spec.size, "gray" if clf.spec.colour == "gray" else "bgr", where=where)
    if ds.targets is None:
        raise DataError(f"{data}: calibration needs vote columns (one per emotion), e.g. FER+")
    probs = clf(ds.images)
    t = fit_temperature(probs, ds.targets)
    from fer_batch.classify import apply_temperature

    lab = ds.labels >= 0
    before, after = vote_metrics(probs[lab], ds.targets[lab]), vote_metrics(apply_temperature(probs, t)[lab], ds.targets[lab])
    cmd = "fer-batch " + shlex.join(sys.argv[sys.argv.index("calibrate"):]) if "calibrate" in sys.argv else ""
    cal = {
        "temperature": round(t, 4),
        "method": "temperature scaling: minimise the NLL of the 7-emotion vote distribution (all rows with votes)",
        "fitted_on": f"{Path(data).name}" + (f" where {where}" if where else "") + f" ({len(ds)} rows with votes)",
        "majority_rows": int(lab.sum()),
        "before": {"nll": round(before["nll"], 4), "ece": round(before["ece"], 4)},
        "after": {"nll": round(after["nll"], 4), "ece": round(after["ece"], 4)},
        "command": portable(cmd) if cmd else f"fer-batch calibrate {clf.card.name} {Path(data).name}" + (f" --where {where}" if where else ""),
    }
    if write:
        card_path = Path(clf.card.card_path)
        raw = yaml.safe_load(card_path.read_text())
        raw["calibration"] = cal
        text = yaml.safe_dump(raw, sort_keys=False, width=110)
        tmp = card_path.with_name(card_path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(card_path)
        from fer_batch.models import registry

        registry.cache_clear()
    log.info("temperature %.4f: nll %.4f -> %.4f, ece %.4f -> %.4f", t, before["nll"], after["nll"], before["ece"], after["ece"])
    return cal
