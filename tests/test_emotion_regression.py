"""Regression guard for the shipped emotion models: re-measure a fixed FER2013 subset.

Each emotion card records ``metrics.regression_subset`` (accuracy and macro-F1 on the first
every 7th row of fer2013_test.parquet (1,026 images), no TTA, plain crops). Where the real data is present
(``../shared``, or ``FER_BATCH_SHARED``), the file on disk must reproduce them; elsewhere the
test is skipped. Any change to the model file, the preprocessing or the label mapping shows
up here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fer_batch.models import Registry

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FER_BATCH_SHARED", REPO.parent / "shared"))
TEST = SHARED / "data" / "fer2013" / "fer2013_test.parquet"
FERPLUS = SHARED / "data" / "ferplus" / "ferplus.parquet"

CARDS = [c for c in Registry.from_dir(REPO / "models").cards("emotion_classification")]


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("card", CARDS, ids=[c.name for c in CARDS])
def test_fixed_subset_metrics_reproduce(card):
    if not TEST.is_file():
        pytest.skip(f"{TEST} not present")
    ref = (card.metrics or {}).get("regression_subset")
    if not ref:
        pytest.fail(f"card {card.name} has no metrics.regression_subset baseline")
    from fer_batch.train.evaluate import run

    m = run(card.name, str(TEST), tta=False, threads=2, every=int(ref["every"]), models_dir=str(REPO / "models"))
    assert m["n"] == int(ref["n"])
    assert abs(m["accuracy"] - float(ref["accuracy"])) <= 0.002, (card.name, m["accuracy"], ref)
    assert abs(m["macro_f1"] - float(ref["macro_f1"])) <= 0.003, (card.name, m["macro_f1"], ref)


def test_default_emotion_model_has_a_baseline():
    card = Registry.from_dir(REPO / "models").default("emotion_classification")
    ref = card.metrics.get("regression_subset")
    assert ref and 0 < float(ref["accuracy"]) <= 1 and int(ref["n"]) >= 500


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("card", [c for c in CARDS if (c.metrics or {}).get("regression_subset_ferplus")],
                         ids=[c.name for c in CARDS if (c.metrics or {}).get("regression_subset_ferplus")])
def test_ferplus_subset_metrics_reproduce(card):
    """Cards trained on FER+ votes also pin every 7th FER+ PrivateTest row: accuracy, macro-F1 and
    the calibrated NLL (so a lost or changed temperature shows)."""
    if not FERPLUS.is_file():
        pytest.skip(f"{FERPLUS} not present")
    ref = card.metrics["regression_subset_ferplus"]
    from fer_batch.train.evaluate import run

    m = run(card.name, str(FERPLUS), tta=False, threads=2, every=int(ref["every"]), where=ref["where"], models_dir=str(REPO / "models"))
    assert m["n"] == int(ref["n"])
    assert abs(m["accuracy"] - float(ref["accuracy"])) <= 0.002, (card.name, m["accuracy"], ref)
    assert abs(m["macro_f1"] - float(ref["macro_f1"])) <= 0.003, (card.name, m["macro_f1"], ref)
    assert abs(m["nll"] - float(ref["nll"])) <= 0.003, (card.name, m["nll"], ref)
