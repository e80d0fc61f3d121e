"""Checkpoint files: written atomically, read back only with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and Python primitives (model/optimizer/scheduler state,
the run's arguments, label order, preprocessing, history); a file that would need arbitrary
unpickling is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fer_batch.errors import ModelError

CKPT_FORMAT = "fer-batch-checkpoint/1"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (its folder is created when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a fer-batch checkpoint safely (``weights_only=True``); ModelError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: checkpoint not found")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for untrusted objects, RuntimeError for corrupt zips
        raise ModelError(
            f"{p}: refused or unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "only weights-only files (tensors and plain values), safetensors or ONNX are accepted, never arbitrary pickles"
        ) from e
    if not isinstance(ck, dict):
        raise ModelError(f"{p}: not a checkpoint dict")
    return ck


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A bare state dict from ``.safetensors`` or a weights-only torch file (a fer-batch checkpoint's ``model`` too)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ModelError(f"{p}: reading .safetensors needs the safetensors package") from e
        return load_file(str(p))
    ck = load_checkpoint(p)
    if ck.get("format") == CKPT_FORMAT:
        return ck["model"]
    for key in ("state_dict", "model"):
        if isinstance(ck.get(key), dict):
            ck = ck[key]
    return {k.removeprefix("module."): v for k, v in ck.items() if isinstance(v, torch.Tensor)}
