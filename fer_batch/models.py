"""Model registry: ``ModelCard`` objects read from ``models/*.yaml``.

Every model carries a card (task, file, sha256, preprocessing, labels, licence, provenance,
metrics). Preprocessing is always derived from the card, never a literal in a stage.

Where the default pack lives:
  * a non-editable install carries it as ``fer_batch/_models`` (force-included into the wheel);
  * a source checkout / editable install reads ``<repo>/models``;
  * ``FER_BATCH_MODELS_DIR`` or an explicit ``models_dir`` overrides both (read by the CLI only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from fer_batch.errors import ModelError
from fer_batch.types import EMOTIONS

TASKS = ("face_detection", "emotion_classification", "face_recognition", "face_embedding")
FORMATS = ("onnx",)
REQUIRED_FIELDS = ("name", "task", "format", "file", "sha256", "input", "licence", "provenance", "metrics")

# Aliases accepted for the canonical emotion labels (cards, datasets).
LABEL_ALIASES = {
    "anger": "angry", "angry": "angry", "mad": "angry",
    "disgust": "disgust", "disgusted": "disgust", "contempt": None,
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "neutral": "neutral", "calm": "neutral",
}


def canonical_label(label: str) -> str | None:
    """Map a label or alias onto one of ``EMOTIONS``; ``None`` if it has no canonical emotion."""
    return LABEL_ALIASES.get(str(label).strip().lower())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelCard:
    """The card of one model file. ``path`` is the resolved model file."""

    name: str
    task: str
    format: str
    file: str
    sha256: str
    input: dict[str, Any]
    licence: str
    provenance: dict[str, Any]
    metrics: dict[str, Any]
    labels: tuple[str, ...] = ()
    preprocess: dict[str, Any] = field(default_factory=dict)
    default: bool = False
    description: str = ""
    recipe: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    card_path: Path | None = None
    path: Path | None = None

    @classmethod
    def from_yaml(cls, card_path: Path) -> "ModelCard":
        try:
            raw = yaml.safe_load(Path(card_path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ModelError(f"{card_path}: cannot read model card: {e}") from e
        if not isinstance(raw, dict):
            raise ModelError(f"{card_path}: model card must be a mapping, got {type(raw).__name__}")
        return cls.from_dict(raw, card_path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], card_path: Path | None = None) -> "ModelCard":
        where = card_path or raw.get("name", "<card>")
        missing = [k for k in REQUIRED_FIELDS if k not in raw]
        if missing:
            raise ModelError(f"{where}: model card lacks field(s) {missing}")
        if raw["task"] not in TASKS:
            raise ModelError(f"{where}: task {raw['task']!r} is not one of {TASKS}")
        if raw["format"] not in FORMATS:
            raise ModelError(f"{where}: format {raw['format']!r} is not one of {FORMATS}")
        labels = tuple(raw.get("labels") or ())
        if raw["task"] == "emotion_classification":
            mapped = [canonical_label(lbl) for lbl in labels]
            if len(labels) != len(EMOTIONS) or sorted(m for m in mapped if m) != sorted(EMOTIONS):
                raise ModelError(f"{where}: labels {list(labels)} do not map onto the 7 emotions {list(EMOTIONS)}")
        base = Path(card_path).parent if card_path else Path(".")
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in raw.items() if k in known and k not in ("card_path", "path", "labels")}
        return cls(**kw, labels=labels, card_path=card_path, path=(base / raw["file"]).resolve())

    def verify(self) -> "ModelCard":
        """Check the file exists and its sha256 matches the card. Return self."""
        if self.path is None or not self.path.is_file():
            raise ModelError(f"model {self.name!r}: file {self.path} is missing")
        actual = sha256_file(self.path)
        if actual != self.sha256:
            raise ModelError(
                f"model {self.name!r}: sha256 of {self.path} is {actual}, the card says {self.sha256} "
                "(corrupt or replaced file; rebuild with `fer-batch models build`)"
            )
        return self

    def label_index(self) -> list[int]:
        """For each output of the model, its index in ``EMOTIONS``."""
        return [EMOTIONS.index(canonical_label(lbl)) for lbl in self.labels]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "format": self.format,
            "input": self.input,
            "licence": self.licence,
            "sha256": self.sha256,
            "metrics": self.metrics,
            "default": self.default,
        }


def default_models_dir() -> Path:
    """The default pack: packaged copy in a wheel install, else ``<repo>/models``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_models", here.parent / "models"):
        if cand.is_dir() and any(cand.glob("*.yaml")):
            return cand
    raise ModelError(f"no default model pack found (looked in {here / '_models'} and {here.parent / 'models'})")


class Registry:
    """Model cards keyed by name. Duplicate names raise; unknown names list the valid ones."""

    def __init__(self, cards: list[ModelCard]):
        self._cards: dict[str, ModelCard] = {}
        for c in cards:
            if c.name in self._cards:
                raise ModelError(f"duplicate model name {c.name!r} ({c.card_path} and {self._cards[c.name].card_path})")
            self._cards[c.name] = c

    @classmethod
    def from_dir(cls, models_dir: Path | None = None) -> "Registry":
        d = Path(models_dir) if models_dir else default_models_dir()
        if not d.is_dir():
            raise ModelError(f"model directory {d} does not exist")
        return cls([ModelCard.from_yaml(p) for p in sorted(d.glob("*.yaml"))])

    def names(self) -> list[str]:
        return sorted(self._cards)

    def cards(self, task: str | None = None) -> list[ModelCard]:
        return [self._cards[n] for n in self.names() if task is None or self._cards[n].task == task]

    def get(self, name: str) -> ModelCard:
        if name not in self._cards:
            raise ModelError(f"unknown model {name!r}; known models: {', '.join(self.names()) or '(none)'}")
        return self._cards[name]

    def default(self, task: str) -> ModelCard:
        cands = [c for c in self.cards(task) if c.default]
        if len(cands) != 1:
            raise ModelError(f"expected exactly one default {task} model, found {[c.name for c in cands]}")
        return cands[0]

    def resolve(self, name_or_path: str | None, task: str) -> ModelCard:
        """A registered name, ``default``/None, a card (.yaml) path, or a model file with a card beside it."""
        if name_or_path in (None, "", "default"):
            return self.default(task)
        if name_or_path in self._cards:
            card = self._cards[name_or_path]
        else:
            p = Path(name_or_path)
            if p.suffix in (".yaml", ".yml") and p.is_file():
                card = ModelCard.from_yaml(p)
            elif p.is_file() and p.with_suffix(".yaml").is_file():
                card = ModelCard.from_yaml(p.with_suffix(".yaml"))
            elif p.exists():
                raise ModelError(f"{p}: no model card beside it (expected {p.with_suffix('.yaml')})")
            else:
                raise ModelError(
                    f"unknown model {name_or_path!r}: not a registered name nor an existing path; "
                    f"known models: {', '.join(self.names())}"
                )
        if card.task != task:
            raise ModelError(f"model {card.name!r} is a {card.task} model, expected {task}")
        return card


@lru_cache(maxsize=4)
def registry(models_dir: str | None = None) -> Registry:
    return Registry.from_dir(Path(models_dir) if models_dir else None)


def cards_json(reg: Registry) -> str:
    return json.dumps([c.summary() for c in reg.cards()], indent=2, default=str)
