"""Start training from a shipped ONNX emotion model (transfer learning without its checkpoint).

fer-batch's own exports (``fer-batch export``) keep the PyTorch module path in every node name
(``/net/members.1/features/features.7/Conv``), so one member of a shipped ensemble can be read
back into a :class:`~fer_batch.train.nets.VGGNet` of the same widths:

* convolution weights and biases come from the graph, where the exporter has folded each
  BatchNorm into the convolution before it (``W' = W * g / s``, ``b' = beta - mu * g / s``);
* each BatchNorm is then re-created so that it reproduces the folded convolution exactly, both
  in eval mode and, on data like the training set, in train mode: its statistics are measured
  on calibration images layer by layer (``mu``, ``sigma`` of the folded conv output) and it is
  set to ``gamma = sigma``, ``beta = mu + b'``, ``running_mean = mu``, ``running_var = sigma**2 - eps``,
  so ``BN(W' x) = W' x + b'``;
* the classification head is the member's ``Gemm``.

``--init vgg_fer2013#1`` (card name or ONNX path, ``#`` member index, default 0) selects it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fer_batch.errors import ModelError

log = logging.getLogger(__name__)
# conv / head node names of a fer-batch VGG export: "/net/members.K/net/..." in an ensemble,
# "/net/net/..." (two-head) or "/net/..." for a single network (member 0)
_CONV = re.compile(r"^/net/(?:members\.(\d+)/)?(?:net/)?features/features\.(\d+)/Conv")
_HEAD = re.compile(r"^/net/(?:members\.(\d+)/)?(?:net/)?head/head\.\d+/Gemm")


def resolve_onnx(ref: str) -> tuple[Path, int]:
    """``NAME[#k]`` or ``PATH.onnx[#k]`` -> (ONNX file, member index)."""
    base, _, member = ref.partition("#")
    try:
        k = int(member) if member else 0
    except ValueError as e:
        raise ModelError(f"--init {ref}: the member after '#' must be an integer") from e
    p = Path(base)
    if p.suffix == ".onnx" and p.is_file():
        return p, k
    from fer_batch.models import registry

    card = registry().get(base).verify()
    return Path(card.path), k


def _tensors(graph) -> dict[str, np.ndarray]:
    """Every initializer and Constant as float32 arrays, following Cast nodes (fp16-stored weights)."""
    from onnx import numpy_helper

    vals = {i.name: numpy_helper.to_array(i).astype(np.float32) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Cast" and n.input[0] in vals:
            vals[n.output[0]] = vals[n.input[0]]
    return vals


def member_weights(onnx_path: Path, member: int) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """({feature index: (conv W, conv b)}, (head W (K, C), head b)) of one ensemble member."""
    import onnx

    g = onnx.load(str(onnx_path)).graph
    vals = _tensors(g)
    convs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    head = None
    for n in g.node:
        m = _CONV.search(n.output[0]) if n.op_type == "Conv" else None
        if m and int(m.group(1) or 0) == member:
            if len(n.input) < 3:
                raise ModelError(f"{onnx_path}: conv {n.output[0]} has no bias (BatchNorm not folded?)")
            convs[int(m.group(2))] = (vals[n.input[1]], vals[n.input[2]])
        h = _HEAD.search(n.output[0]) if n.op_type == "Gemm" else None
        if h and int(h.group(1) or 0) == member:
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            w = vals[n.input[1]]
            head = (w if trans_b else w.T, vals[n.input[2]])
    if not convs or head is None:
        raise ModelError(f"{onnx_path}: no ensemble member {member} in this graph (a fer-batch VGG export is needed)")
    return convs, head


@torch.no_grad()
def init_vgg_from_onnx(model: nn.Module, onnx_path: Path, member: int, calib: torch.Tensor) -> None:
    """Load member ``member`` of ``onnx_path`` into ``model`` (a VGGNet); ``calib``: float input batch."""
    convs, (hw, hb) = member_weights(onnx_path, member)
    feats = list(model.features)
    mine = [i for i, mod in enumerate(feats) if isinstance(mod, nn.Conv2d)]
    if sorted(convs) != mine:
        raise ModelError(f"{onnx_path} member {member}: conv layers {sorted(convs)} do not match the architecture's {mine}")
    model.eval()
    h = calib
    i = 0
    while i < len(feats):
        mod = feats[i]
        if isinstance(mod, nn.Conv2d):
            w, b = convs[i]
            if tuple(w.shape) != tuple(mod.weight.shape):
                raise ModelError(f"{onnx_path} member {member}: conv {i} has shape {w.shape}, the model {tuple(mod.weight.shape)}")
            mod.weight.copy_(torch.from_numpy(w))
            x = mod(h)
            bn = feats[i + 1]
            if not isinstance(bn, nn.BatchNorm2d):
                raise ModelError(f"expected BatchNorm after conv {i}")
            mu = x.mean((0, 2, 3))
            var = x.var((0, 2, 3), unbiased=False).clamp_min(2 * bn.eps)
            bn.running_mean.copy_(mu)
            bn.running_var.copy_(var - bn.eps)
            bn.weight.copy_(var.sqrt())
            bn.bias.copy_(mu + torch.from_numpy(b))
            h = torch.relu(bn(x))
            i += 3  # conv, bn, relu
            continue
        h = mod(h)
        i += 1
    lin = model.head[-1]
    k = hw.shape[0]
    if lin.weight.shape[1] != hw.shape[1] or lin.weight.shape[0] % k:
        raise ModelError(f"{onnx_path} member {member}: head {hw.shape} vs the model's {tuple(lin.weight.shape)}")
    for j in range(0, lin.weight.shape[0], k):  # a two-head model starts both heads from this one
        lin.weight[j : j + k].copy_(torch.from_numpy(np.ascontiguousarray(hw)))
        lin.bias[j : j + k].copy_(torch.from_numpy(hb))
    log.info("init: member %d of %s (%d convs, BatchNorm re-created on %d calibration images)", member, onnx_path, len(convs), len(calib))
