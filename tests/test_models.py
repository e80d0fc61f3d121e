"""Every model card in ``models/``, the registry's error paths, and the packaged default pack."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fer_batch.errors import ModelError
from fer_batch.models import EMOTIONS, REQUIRED_FIELDS, ModelCard, Registry, canonical_label, sha256_file

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
CARDS = sorted(MODELS.glob("*.yaml"))


def test_there_are_cards():
    assert CARDS, f"no model cards in {MODELS}"


@pytest.mark.parametrize("card_path", CARDS, ids=[p.stem for p in CARDS])
def test_card_is_complete_and_matches_its_file(card_path):
    raw = yaml.safe_load(card_path.read_text())
    missing = [f for f in REQUIRED_FIELDS if f not in raw]
    assert not missing, f"{card_path.name} lacks {missing}"
    card = ModelCard.from_yaml(card_path)
    assert card.name == card_path.stem, "card file name = model name"
    assert card.path.is_file(), f"{card.path} missing"
    assert MODELS in card.path.parents, "model files live inside models/"
    assert sha256_file(card.path) == card.sha256
    card.verify()
    # input description: size (or dynamic), colour, mean/std (in `input` or `preprocess`)
    for key in ("size", "colour", "mean", "std"):
        assert key in card.input or key in (card.preprocess or {}), f"{card.name}: card states no input {key!r}"
    assert card.licence and card.provenance
    assert isinstance(card.metrics, dict)
    if card.metrics:
        assert card.metrics.get("command"), f"{card.name}: metrics must state the command that measured them"
    if card.task == "emotion_classification":
        mapped = [canonical_label(lbl) for lbl in card.labels]
        assert None not in mapped and sorted(mapped) == sorted(EMOTIONS), card.labels
        assert len(card.labels) == 7


def test_exactly_one_default_per_task():
    reg = Registry.from_dir(MODELS)
    tasks = Counter(c.task for c in reg.cards())
    for task in tasks:
        defaults = [c.name for c in reg.cards(task) if c.default]
        assert len(defaults) == 1, f"{task}: defaults {defaults}"
        assert reg.default(task).name == defaults[0]
    assert "face_detection" in tasks


def test_unknown_name_lists_known_ones():
    reg = Registry.from_dir(MODELS)
    with pytest.raises(ModelError) as e:
        reg.get("no_such_model")
    for name in reg.names():
        assert name in str(e.value)
    with pytest.raises(ModelError) as e:
        reg.resolve("no_such_model", "face_detection")
    assert reg.names()[0] in str(e.value)


def test_duplicate_name_raises(tmp_path):
    src = MODELS / "retinaface_mnet025.yaml"
    shutil.copy(src, tmp_path / "a.yaml")
    shutil.copy(src, tmp_path / "b.yaml")
    with pytest.raises(ModelError, match="duplicate model name 'retinaface_mnet025'"):
        Registry.from_dir(tmp_path)


def test_card_lacking_a_field_raises(tmp_path):
    raw = yaml.safe_load((MODELS / "retinaface_mnet025.yaml").read_text())
    del raw["licence"]
    p = tmp_path / "x.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelError, match="licence"):
        ModelCard.from_yaml(p)


def test_bad_labels_raise():
    raw = yaml.safe_load((MODELS / "retinaface_mnet025.yaml").read_text())
    raw.update(task="emotion_classification", labels=["happy", "sad", "cat", "fear", "angry", "disgust", "neutral"])
    with pytest.raises(ModelError, match="do not map onto the 7 emotions"):
        ModelCard.from_dict(raw)


@pytest.mark.slow
def test_built_wheel_carries_the_default_pack(tmp_path):
    """A non-editable build ships ``fer_batch/_models`` with every card and model file intact."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "fer_batch", src / "fer_batch", ignore=ignore)
    shutil.copytree(MODELS, src / "models", ignore=ignore)
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / f).is_file():
            shutil.copy(REPO / f, src / f)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(src)]
    if importlib.util.find_spec("hatchling") is not None:
        cmd.insert(4, "--no-build-isolation")  # offline; else pip fetches hatchling into an isolated env
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheels = list((tmp_path / "dist").glob("fer_batch-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "installed")
    for card_path in CARDS:
        card = ModelCard.from_yaml(card_path)
        assert f"fer_batch/_models/{card_path.name}" in names
        assert f"fer_batch/_models/{Path(card.file).as_posix()}" in names
    assert any(n.endswith(".onnx") for n in names)
    # The packaged pack is a working registry whose files match their cards.
    reg = Registry.from_dir(tmp_path / "installed" / "fer_batch" / "_models")
    assert sorted(reg.names()) == sorted(p.stem for p in CARDS)
    for c in reg.cards():
        c.verify()
    assert reg.default("face_detection").name


def test_every_builder_pins_its_package_sha256_and_matches_its_card():
    """``models build`` checks each downloaded package against a sha256 pinned in code; the
    card's provenance records the same value."""
    from fer_batch.convert.build import BUILDERS

    assert BUILDERS
    for name, b in BUILDERS.items():
        assert len(b.sha256) == 64, name
        card = ModelCard.from_yaml(MODELS / f"{name}.yaml")
        assert card.file == b.file
        recorded = card.provenance.get("wheel_sha256") or card.provenance.get("package_sha256")
        assert recorded == b.sha256, f"{name}: card says {recorded}, builder pins {b.sha256}"


def test_face_embedding_card():
    card = Registry.from_dir(MODELS).default("face_embedding")
    assert card.name == "dlib_face_resnet"
    assert card.licence.startswith("CC0 1.0")
    assert "VGG-Face" in card.provenance["training_data_note"] and "FaceScrub" in card.provenance["training_data_note"]
    reid = card.metrics["reid"]
    for key in ("cosine_threshold", "euclidean_threshold", "same_pairs", "different_pairs"):
        assert key in reid, key
    assert min(reid["cosine_same_ok"], reid["cosine_different_ok"]) >= 0.98
    assert card.metrics["parity"]["max_abs_diff_vs_numpy_reference"] <= 1e-4
    assert card.preprocess["size"] == 150 and len(card.preprocess["align_template"]["points"]) == 5
