"""``fer-batch export``: a training checkpoint -> ONNX file + model card in the registry.

The ONNX graph takes (N, C, S, S) float32 (dynamic batch) and outputs softmax probabilities in
the checkpoint's label order. Every export is checked against PyTorch on real or random
inputs (max |difference| <= 1e-4 in fp32; looser for ``fp16``) and refused otherwise.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from fer_batch.errors import ModelError
from fer_batch.models import sha256_file
from fer_batch.preprocess import PreprocessSpec, prepare
from fer_batch.train.calibrate import portable
from fer_batch.train.engine import TrainArgs, load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)


class _Probs(nn.Module):
    def __init__(self, net: nn.Module, fp16: bool = False):
        super().__init__()
        self.net = net.half() if fp16 else net
        self.fp16 = fp16

    def forward(self, x):
        if self.fp16:
            return self.net(x.half()).float().softmax(1)
        return self.net(x).softmax(1)


class Ensemble(nn.Module):
    """Members that share one preprocessing and label order; outputs the mean of their softmax.

    Exported as one ONNX graph, so the pipeline runs it like any single model. ``forward``
    returns log-probabilities so that ``.softmax(1)`` (what the export and parity wrap every
    model with) gives back exactly the averaged probabilities.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        p = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        return torch.log(p.clamp_min(1e-12))


def load_members(ckpts: list[str], head_mix: float | None = None) -> tuple[nn.Module, PreprocessSpec, list[str], list[dict[str, Any]]]:
    """One checkpoint, or several as an ``Ensemble``; ModelError when they do not fit together.

    ``head_mix`` sets the mix of two-head checkpoints (None: each run's own ``--head-mix``).
    """
    if not ckpts:
        raise ModelError("export: no checkpoint given")
    models, cks = [], []
    spec0 = labels0 = None
    for c in ckpts:
        ck = load_checkpoint(c)
        model, spec, labels = model_from_checkpoint(ck, head_mix)
        if spec0 is None:
            spec0, labels0 = spec, labels
        elif spec.to_dict() != spec0.to_dict() or labels != labels0:
            raise ModelError(
                f"{c}: cannot join an ensemble with {ckpts[0]}: preprocessing {spec.to_dict()} / labels {labels} differ "
                f"from {spec0.to_dict()} / {labels0}"
            )
        models.append(model)
        cks.append(ck)
    model = models[0] if len(models) == 1 else Ensemble(models).eval()
    return model, spec0, labels0, cks


def export_onnx(model: nn.Module, spec: PreprocessSpec, path: Path, fp16: bool = False, opset: int = 17) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().to(memory_format=torch.contiguous_format)
    x = torch.zeros(1, spec.channels, spec.input_size, spec.input_size)
    torch.onnx.export(_Probs(model, fp16).eval(), (x,), str(path), input_names=["input"], output_names=["probs"],
                      dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}}, opset_version=opset, dynamo=False)


def store_weights_fp16(path: Path, min_elements: int = 64) -> int:
    """Rewrite the ONNX file with its float32 weights stored as float16, each behind a Cast.

    Halves the file. ONNX Runtime folds the casts when it loads the session, so inference still
    runs in float32 at the same speed; only the weights' rounding changes (the parity check
    after this measures it). Returns the number of tensors converted.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inits, casts = [], []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= min_elements:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{init.name}__fp16")
            inits.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT, name=f"{init.name}__cast"))
        else:
            inits.append(init)
    nodes = casts + list(g.node)
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    tmp = path.with_suffix(".tmp")
    onnx.save(m, str(tmp))
    tmp.replace(path)
    return len(casts)


def parity(model: nn.Module, path: Path, x: np.ndarray, fp16: bool = False, tol: float | None = None) -> float:
    """Max |ONNX - PyTorch| of the probabilities on ``x``; ModelError above the tolerance."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    with torch.no_grad():
        want = model.eval().float()(torch.from_numpy(x)).softmax(1).numpy()
    diff = float(np.abs(got - want).max())
    tol = tol if tol is not None else (2e-2 if fp16 else 1e-4)
    if not diff <= tol:
        raise ModelError(f"{path}: ONNX output differs from PyTorch by {diff:.2e} (tolerance {tol:.0e}); export refused")
    return diff


def faces_per_second(path: Path, spec: PreprocessSpec, batch: int = 64, threads: int = 2, seconds: float = 8.0, tta: bool = False) -> float:
    """Batched CPU throughput of the ONNX file (preprocessing of 48x48 crops included)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (batch, spec.size, spec.size, spec.channels), dtype=np.uint8)
    sess.run(None, {"input": prepare(crops, spec)})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = prepare(crops, spec)
        sess.run(None, {"input": x})
        if tta:
            sess.run(None, {"input": np.ascontiguousarray(x[..., ::-1])})
        n += batch
    return n / (time.perf_counter() - t0)


def export(ckpt: str | list[str], name: str, models_dir: Path, fp16: bool = False, tta: bool = False, store_fp16: bool = False, template_from: str | None = "mini_xception_fer",
           default: bool = False, metrics: dict[str, Any] | None = None, description: str = "", sample: np.ndarray | None = None,
           head_mix: float | None = None) -> Path:
    """Write ``models_dir/NAME/emotion_NAME.onnx`` and ``models_dir/NAME.yaml``; return the card path.

    ``ckpt``: one checkpoint, or a list of them exported as one ensemble (mean probabilities).
    """
    ckpts = [ckpt] if isinstance(ckpt, (str, Path)) else [str(c) for c in ckpt]
    model, spec, labels, cks = load_members(ckpts, head_mix)
    member_args = [TrainArgs.from_dict(json.loads(ck["args"])) for ck in cks]
    votes = any(a.hard_label or "ferplus" in Path(a.data).name.lower() for a in member_args)
    stored_half = store_fp16 and not fp16  # fp16 graphs already hold half weights
    onnx_path = models_dir / name / f"emotion_{name}{'_fp16' if fp16 else ''}.onnx"
    export_onnx(model, spec, onnx_path, fp16)
    if stored_half:
        n = store_weights_fp16(onnx_path)
        log.info("%s: %d weight tensors stored as float16 (computed in float32)", onnx_path, n)
    if sample is None:
        sample = np.random.default_rng(0).integers(0, 256, (64, spec.size, spec.size, spec.channels), dtype=np.uint8)
    diff = parity(model, onnx_path, prepare(sample, spec), fp16, tol=2e-3 if stored_half else None)
    log.info("ONNX parity: max |diff| %.2e over %d inputs", diff, len(sample))
    pre = spec.to_dict()
    pre["tta"] = bool(tta)
    if template_from and "align_template" not in pre:
        from fer_batch.models import Registry

        src = PreprocessSpec.from_card(Registry.from_dir(models_dir).get(template_from))
        if src.template is not None:
            pre["align_template"] = {"size": int(src.template_size or src.size), "points": [[round(float(v), 3) for v in pt] for pt in src.template]}
    n_params = sum(p.numel() for p in model.parameters())
    card = {
        "name": name,
        "task": "emotion_classification",
        "format": "onnx",
        "file": f"{name}/{onnx_path.name}",
        "sha256": sha256_file(onnx_path),
        "default": bool(default),
        "description": description or _default_description(member_args, n_params),
        "input": {"layout": "NCHW", "size": spec.input_size, "colour": spec.colour, "dtype": "float32",
                  "range": "(pixel / 255 - mean) / std", "name": "input", "output": "probs"},
        "labels": list(labels),
        "preprocess": pre,
        "licence": "MIT (fer-batch's part); trained on FER2013 images (research-use data), see provenance.data_note",
        "provenance": {
            "trained_by": "fer-batch train (this project)",
            "data": sorted({Path(a.data).name for a in member_args}),
            "data_note": ("FER2013 (ICML 2013 challenge) is distributed for research use and these weights are derived "
                          "from it" + (" (labels: Microsoft's FER+ crowd votes, MIT, and FER2013's own labels)" if votes else "")
                          + ". fer-batch's own part is MIT, but the dataset's terms may limit what a derived model "
                          "may be used for (e.g. commercially): review them before deploying."),
            **({"head_mix": head_mix if head_mix is not None else member_args[0].head_mix,
                "head_mix_note": "two-head members: output = mix x P(vote head) + (1 - mix) x P(hard-label head)"}
               if any(a.hard_label and a.hard_mode == "head" and a.hard_weight > 0 for a in member_args) else {}),
            **_member_provenance(ckpts, cks, member_args),
            "parity_max_abs_diff": float(f"{diff:.3g}"),
            "fp16": bool(fp16),
            "weights_storage": "float16 (cast to float32 when loaded; computed in float32)" if stored_half
            else ("float16 (computed in float16)" if fp16 else "float32"),
            "build": {"torch": str(torch.__version__), "python": platform.python_version(), "machine": platform.processor() or platform.machine()},
        },
        "recipe": _recipe(member_args),
        "metrics": metrics or {},
    }
    card_path = models_dir / f"{name}.yaml"
    card_path.write_text(yaml.safe_dump(card, sort_keys=False, width=110))
    return card_path


def _member_facts(path: str, ck: dict[str, Any]) -> dict[str, Any]:
    hist = json.loads(ck.get("history", "[]"))
    if ck.get("derived_from"):  # read back from a shipped ONNX member: its card's record stands
        d = json.loads(ck["derived_from"])
        rec = d.get("record") or {}
        return {
            "checkpoint_sha256": sha256_file(Path(path)),
            "derived_from": f"member {d.get('member')} of {d.get('model')} (ONNX sha256 {d.get('onnx_sha256')}), "
                            "read back exactly with examples/ferplus/ckpt_from_onnx.py",
            **{k: rec[k] for k in ("epochs_run", "best_epoch", "val_macro_f1", "train_seconds") if k in rec},
            "original_checkpoint_sha256": rec.get("checkpoint_sha256"),
        }
    return {
        "checkpoint_sha256": sha256_file(Path(path)),
        "epochs_run": len(hist),
        "best_epoch": int(ck.get("best_epoch", -1)) + 1,
        "val_macro_f1": float(ck.get("best_f1", float("nan"))),
        "train_seconds": round(float(ck.get("spent_s", 0.0))),
    }


def _member_provenance(paths: list[str], cks: list[dict[str, Any]], member_args: list[TrainArgs]) -> dict[str, Any]:
    if len(cks) == 1:
        return _member_facts(paths[0], cks[0])
    members = []
    for p, ck, a in zip(paths, cks, member_args):
        members.append({"arch": a.arch, **_member_facts(p, ck), "recipe": portable(a.command) if a.command else "(no recorded command)"})
    return {"ensemble": "mean of the members' softmax probabilities", "members": members,
            "train_seconds": sum(m["train_seconds"] for m in members)}


def _recipe(member_args: list[TrainArgs]) -> str:
    cmds = [portable(a.command) if a.command else "(checkpoint has no recorded command)" for a in member_args]
    return cmds[0] if len(cmds) == 1 else " && ".join(cmds) + "  # then: fer-batch export RUN1/best.pt RUN2/best.pt ..."


def _default_description(member_args: list[TrainArgs], n_params: int) -> str:
    archs = [a.arch for a in member_args]
    if len(archs) == 1:
        return f"{archs[0].get('name')} {archs[0]} ({n_params:,} parameters) trained with fer-batch train."
    return f"Ensemble of {len(archs)} ({', '.join(str(a) for a in archs)}; {n_params:,} parameters in all), trained with fer-batch train."
