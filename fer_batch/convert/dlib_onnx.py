"""dlib's face-recognition ResNet as an ONNX graph, built node by node (byte-reproducible), and its
parity with the numpy reference forward of :mod:`fer_batch.convert.dlib_resnet`.

``python -m fer_batch.convert.dlib_onnx DAT ONNX CHIPS.npz`` measures that parity on saved chips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fer_batch.convert.dlib_resnet import (EMBED_DIM, FILE_IN_SDIST, INPUT_NAME, OUTPUT_NAME, DlibNet, Layer, normalise, read_file,
                                          reference_forward)
from fer_batch.errors import ModelError


# --- ONNX graph --------------------------------------------------------------------------

def _fold(conv: Layer, aff: Layer) -> tuple[np.ndarray, np.ndarray]:
    g, be = aff.params["gamma"], aff.params["beta"]
    w = (conv.params["w"] * g[:, None, None, None]).astype(np.float32)
    b = (conv.params["b"] * g + be).astype(np.float32)
    return w, b


def folded_layers(net: DlibNet) -> list[dict]:
    """The network as a flat list of ops with affine folded into the preceding convolution.

    Each entry: ``{"op": "conv", "w", "b", "stride", "pad"}``, ``{"op": "relu"}``,
    ``{"op": "max_pool", ...}``, ``{"op": "block", "c1": (w, b, stride, pad), "c2": ..., "down"}``,
    ``{"op": "gap"}``, ``{"op": "fc", "w"}``. Shared by the ONNX writer and the PyTorch module.
    """
    ops: list[dict] = []
    layers = net.layers
    i = 0
    while i < len(layers):
        lay = layers[i]
        if lay.kind == "con":
            if i + 1 >= len(layers) or layers[i + 1].kind != "affine":
                raise ModelError("dlib net: a convolution not followed by affine")
            w, b = _fold(lay, layers[i + 1])
            ops.append({"op": "conv", "w": w, "b": b, "stride": lay.params["stride"], "pad": lay.params["pad"]})
            i += 2
            continue
        if lay.kind == "block":
            c1, a1, _, c2, a2 = lay.params["convs"]
            ops.append({
                "op": "block", "down": lay.params["down"],
                "c1": (*_fold(c1, a1), c1.params["stride"], c1.params["pad"]),
                "c2": (*_fold(c2, a2), c2.params["stride"], c2.params["pad"]),
            })
        elif lay.kind == "relu":
            ops.append({"op": "relu"})
        elif lay.kind == "max_pool":
            ops.append({"op": "max_pool", **lay.params})
        elif lay.kind == "avg_pool_everything":
            ops.append({"op": "gap"})
        elif lay.kind == "fc":
            ops.append({"op": "fc", "w": lay.params["w"]})
        else:
            raise ModelError(f"dlib net: unexpected layer {lay.kind!r}")
        i += 1
    return ops


def _out_hw(h: int, k: int, s: int, p: int) -> int:
    return (h + 2 * p - k) // s + 1


# The seven 256x256x3x3 convolutions (16.5 of the 22.4 MB of weights) are stored as float16:
# 14.2 MB instead of 22.4 and still within the 1e-4 parity target (5.0e-5 on 202 real chips, see the card); all weights
# as float16 would miss it (2.7e-4).
FP16_MIN_ELEMS = 256 * 256 * 3 * 3


def to_onnx(net: DlibNet, fp16_min_elems: int = FP16_MIN_ELEMS):
    """Build the ONNX model (opset 17): ``chip`` (N, 3, 150, 150) normalised -> ``embedding`` (N, 128).

    Args:
        fp16_min_elems: float32 weights with at least this many elements are stored as float16
            behind Cast nodes (computed in float32); 0 stores every weight as float32.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    counter = {"n": 0}

    def name(prefix: str) -> str:
        counter["n"] += 1
        return f"{prefix}_{counter['n']}"

    def const(arr: np.ndarray, prefix: str) -> str:
        n = name(prefix)
        arr = np.ascontiguousarray(arr)
        if fp16_min_elems and arr.dtype == np.float32 and arr.size >= fp16_min_elems:
            inits.append(numpy_helper.from_array(arr.astype(np.float16), n + "_fp16"))
            nodes.append(helper.make_node("Cast", [n + "_fp16"], [n], to=TensorProto.FLOAT, name=n + "_cast"))
        else:
            inits.append(numpy_helper.from_array(arr, n))
        return n

    def conv(x: str, w: np.ndarray, b: np.ndarray, stride, pad) -> str:
        out = name("conv")
        nodes.append(helper.make_node(
            "Conv", [x, const(w, "w"), const(b, "b")], [out], name=out,
            kernel_shape=list(w.shape[2:]), strides=list(stride), pads=[pad[0], pad[1], pad[0], pad[1]],
        ))
        return out

    def relu(x: str) -> str:
        out = name("relu")
        nodes.append(helper.make_node("Relu", [x], [out], name=out))
        return out

    def pad_to(x: str, shape: tuple, target: tuple) -> str:
        if shape == target:
            return x
        out = name("pad")
        pads = [0, 0, 0, 0] + [0] + [t - s for s, t in zip(shape[1:], target[1:])]
        nodes.append(helper.make_node("Pad", [x, const(np.asarray(pads, np.int64), "pads")], [out], name=out,
                                      mode="constant"))
        return out

    x = INPUT_NAME
    c, h = 3, net.chip_size
    for op in folded_layers(net):
        if op["op"] == "conv":
            x = conv(x, op["w"], op["b"], op["stride"], op["pad"])
            c, h = op["w"].shape[0], _out_hw(h, op["w"].shape[2], op["stride"][0], op["pad"][0])
        elif op["op"] == "relu":
            x = relu(x)
        elif op["op"] == "max_pool":
            out = name("maxpool")
            k, s, p = op["k"], op["stride"], op["pad"]
            nodes.append(helper.make_node("MaxPool", [x], [out], name=out, kernel_shape=list(k), strides=list(s),
                                          pads=[p[0], p[1], p[0], p[1]]))
            x, h = out, _out_hw(h, k[0], s[0], p[0])
        elif op["op"] == "block":
            w1, b1, s1, p1 = op["c1"]
            w2, b2, s2, p2 = op["c2"]
            y = relu(conv(x, w1, b1, s1, p1))
            y = conv(y, w2, b2, s2, p2)
            hy = _out_hw(_out_hw(h, 3, s1[0], p1[0]), 3, s2[0], p2[0])
            cy = w2.shape[0]
            if op["down"]:
                skip = name("avgpool")
                nodes.append(helper.make_node("AveragePool", [x], [skip], name=skip, kernel_shape=[2, 2],
                                              strides=[2, 2]))
                hs = _out_hw(h, 2, 2, 0)
            else:
                skip, hs = x, h
            target = (None, max(cy, c), max(hy, hs), max(hy, hs))
            ya = pad_to(y, (None, cy, hy, hy), target)
            sa = pad_to(skip, (None, c, hs, hs), target)
            out = name("add")
            nodes.append(helper.make_node("Add", [ya, sa], [out], name=out))
            x, c, h = out, target[1], target[2]
        elif op["op"] == "gap":
            out = name("gap")
            nodes.append(helper.make_node("GlobalAveragePool", [x], [out], name=out))
            flat = name("flatten")
            nodes.append(helper.make_node("Flatten", [out], [flat], name=flat, axis=1))
            x = flat
        elif op["op"] == "fc":
            nodes.append(helper.make_node("MatMul", [x, const(op["w"], "fc_w")], [OUTPUT_NAME], name="fc"))
            x = OUTPUT_NAME
    if x != OUTPUT_NAME:
        raise ModelError("dlib net: the network does not end with the fc layer")
    graph = helper.make_graph(
        nodes, "dlib_face_resnet_v1",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, net.chip_size, net.chip_size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", EMBED_DIM])],
        inits,
    )
    model = helper.make_model(graph, producer_name="fer-batch", producer_version="dlib_resnet-1",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.doc_string = ("dlib face recognition ResNet v1 (dlib_face_recognition_resnet_model_v1.dat, CC0 1.0), "
                        "read without dlib by fer_batch/convert/dlib_resnet.py; input (v - mean_rgb) / 256, RGB")
    onnx.checker.check_model(model)
    return model


def export_onnx(net: DlibNet, out_path: Path, fp16_min_elems: int = FP16_MIN_ELEMS) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(to_onnx(net, fp16_min_elems).SerializeToString(deterministic=True))
    return out_path


def build(pkg_dir: Path, out_path: Path) -> None:
    """Builder for ``fer-batch models build``: unpacked ``face-recognition-models`` sdist -> ONNX."""
    dat = Path(pkg_dir) / FILE_IN_SDIST
    if not dat.is_file():
        raise ModelError(f"{pkg_dir}: no {FILE_IN_SDIST} (is this face-recognition-models==0.3.0?)")
    export_onnx(read_file(dat), Path(out_path))


def parity(dat: Path, onnx_path: Path, chips_rgb: np.ndarray, batch: int = 16) -> float:
    """Max abs difference between the ONNX file and ``reference_forward`` on RGB uint8 chips."""
    import onnxruntime as ort

    net = read_file(dat)
    x = normalise(chips_rgb, net)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for i in range(0, len(x), batch):
        ref = reference_forward(net, x[i:i + batch])
        got = sess.run(None, {INPUT_NAME: x[i:i + batch]})[0]
        diff = max(diff, float(np.abs(got - ref).max()))
    return diff


if __name__ == "__main__":  # python -m fer_batch.convert.dlib_onnx DAT ONNX CHIPS.npz
    import argparse

    ap = argparse.ArgumentParser(description="ONNX vs numpy reference on saved chips (npz 'chips', BGR uint8)")
    ap.add_argument("dat", type=Path)
    ap.add_argument("onnx", type=Path)
    ap.add_argument("chips", type=Path, help="npz with 'chips' (N, 150, 150, 3) BGR uint8, e.g. embedding_pairs.py --save-chips")
    a = ap.parse_args()
    chips = np.load(a.chips)["chips"][..., ::-1]
    print(f"{len(chips)} chips: max abs difference {parity(a.dat, a.onnx, chips):.3g}")
