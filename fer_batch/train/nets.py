"""Network architectures trainable by ``fer-batch train`` (all take (N, C, S, S) float input)."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGNet(nn.Module):
    """VGG-style: blocks of ``depth`` 3x3 conv+BN+ReLU then 2x2 max-pool; global average pool; dropout; linear."""

    def __init__(self, num_classes: int = 7, in_ch: int = 1, widths=(32, 64, 128, 256), depth: int = 2, dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_ch
        for w in widths:
            for _ in range(depth):
                layers += _conv_bn(c, w)
                c = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """ResNet-style for small faces: stem conv, stages of BasicBlocks (stride 2 between), GAP, linear."""

    def __init__(self, num_classes: int = 7, in_ch: int = 1, widths=(32, 64, 128, 256), blocks=(1, 1, 1, 1), dropout: float = 0.3):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_ch, widths[0]))
        stages, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stages.append(BasicBlock(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.stages(self.stem(x))))


# dlib's face-recognition ResNet-29 (fer_batch.convert.dlib_resnet): (input channels, output
# channels, down) of its 14 residual blocks, input side first.
DLIB_BLOCKS = (
    [(32, 32, False)] * 3 + [(32, 64, True)] + [(64, 64, False)] * 3 + [(64, 128, True)] + [(128, 128, False)] * 2
    + [(128, 256, True)] + [(256, 256, False)] * 2 + [(256, 256, True)]
)


class DlibBlock(nn.Module):
    """conv3x3 -> relu -> conv3x3, added to the input (a 2x2/2 average pool of it when ``down``).

    As in dlib: the strided first conv has no padding, and the sum zero-fills the smaller of
    the two tensors at the end of the channel, row and column axes (``add_prev``).
    """

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.c1 = nn.Conv2d(cin, cout, 3, 2 if down else 1, 0 if down else 1)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(torch.relu(self.c1(x)))
        s = nn.functional.avg_pool2d(x, 2, 2) if self.down else x
        c, h, w = (max(a, b) for a, b in zip(y.shape[1:], s.shape[1:]))
        y = nn.functional.pad(y, (0, w - y.shape[3], 0, h - y.shape[2], 0, c - y.shape[1]))
        s = nn.functional.pad(s, (0, w - s.shape[3], 0, h - s.shape[2], 0, c - s.shape[1]))
        return torch.relu(y + s)


class DlibFaceNet(nn.Module):
    """dlib's face-recognition ResNet-29 body (frozen batch-norm folded into conv biases) with a
    new classification head on its 256-d pooled features.

    ``--init dlib_face`` loads the body from the shipped ``dlib_face_resnet`` card. The network
    was trained on 150x150 colour chips; inputs must be at least 103 px (the unpadded strided
    convolutions shrink smaller inputs to nothing). The input is the training pipeline's
    ``(pixel / 255 - in_mean) / in_std``; a fixed affine inside the network turns it into
    dlib's ``(pixel - mean_rgb) / 256`` (gray: the mean of the three means).
    """

    DLIB_MEAN_RGB = (122.782, 117.001, 104.298)

    def __init__(self, num_classes: int = 7, in_ch: int = 3, dropout: float = 0.3, in_mean: float = 0.5, in_std: float = 0.5):
        super().__init__()
        m = torch.tensor(self.DLIB_MEAN_RGB if in_ch == 3 else (sum(self.DLIB_MEAN_RGB) / 3,) * in_ch)
        self.register_buffer("in_scale", torch.full((1, in_ch, 1, 1), in_std * 255.0 / 256.0))
        self.register_buffer("in_shift", ((in_mean * 255.0 - m) / 256.0).view(1, in_ch, 1, 1))
        self.stem = nn.Conv2d(in_ch, 32, 7, 2, 0)
        self.blocks = nn.Sequential(*[DlibBlock(a, b, d) for a, b, d in DLIB_BLOCKS])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(256, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> the 256-d pooled features (N, 256)."""
        x = x * self.in_scale + self.in_shift
        x = nn.functional.max_pool2d(torch.relu(self.stem(x)), 3, 2)
        return self.pool(self.blocks(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def dlib_face_state_dict(models_dir: str | None = None) -> dict[str, torch.Tensor]:
    """The ``DlibFaceNet`` body weights from the shipped ``dlib_face_resnet`` card (sha256-verified).

    The ONNX graph's 29 Conv nodes, in graph order, are the stem and the two convs of each block.
    """
    from pathlib import Path

    import onnx
    from onnx import numpy_helper

    from fer_batch.errors import ModelError
    from fer_batch.models import Registry

    card = Registry.from_dir(Path(models_dir) if models_dir else None).get("dlib_face_resnet").verify()
    m = onnx.load(str(card.path))
    inits = {i.name: i for i in m.graph.initializer}

    def value(name: str) -> torch.Tensor:
        if name in inits:
            return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())
        # fp16 storage: the weight is the output of a Cast node
        src = next((n.input[0] for n in m.graph.node if n.op_type == "Cast" and n.output[0] == name), None)
        if src is None or src not in inits:
            raise ModelError(f"{card.path}: cannot find the initializer of {name}")
        return torch.from_numpy(numpy_helper.to_array(inits[src]).astype("float32"))

    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    names = ["stem"] + [f"blocks.{i}.{c}" for i in range(len(DLIB_BLOCKS)) for c in ("c1", "c2")]
    if len(convs) != len(names):
        raise ModelError(f"{card.path}: {len(convs)} convolutions, expected {len(names)}")
    sd = {}
    for node, name in zip(convs, names):
        sd[f"{name}.weight"] = value(node.input[1])
        sd[f"{name}.bias"] = value(node.input[2])
    return sd
