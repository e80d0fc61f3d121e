"""Learning from and evaluating against annotators' vote distributions (FER+ layout), calibration,
and transfer from a shipped ONNX model. Real face crops (insightface's t1.jpg), real training,
real ONNX export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fer_batch.classify import apply_temperature
from fer_batch.errors import DataError
from fer_batch.train.data import load_dataset
from fer_batch.train.engine import HeadMix, TrainArgs, load_checkpoint, main, model_from_checkpoint, predict, vote_metrics
from fer_batch.types import EMOTIONS

REPO = Path(__file__).resolve().parents[1]
FERPLUS_COLS = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF"]


def _png(g: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", g)
    assert ok
    return buf.tobytes()


def _votes_table(face_crops, n_per: int = 12, extra_rows: bool = True) -> pa.Table:
    """Smiling faces voted mostly happiness, the others mostly neutral, in FER+'s column layout;
    plus rows that must be skipped (no votes, negative, NaN, mostly not-a-face) or kept without a
    majority (a tie, a contempt majority)."""
    gray, smiling = face_crops
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n_per * len(gray)):
        j = k % len(gray)
        g = np.clip(np.roll(gray[j], int(rng.integers(-2, 3)), 1).astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
        v = dict.fromkeys(FERPLUS_COLS, 0)
        if smiling[j]:
            v.update(happiness=7, surprise=2, neutral=1)
        else:
            v.update(neutral=6, sadness=3, happiness=1)
        usage = "Training" if k % 5 else "PublicTest"
        rows.append({"image": _png(g), **v, "fer_usage": usage, "fer2013_label": "happy" if smiling[j] else "sad"})
    if extra_rows:
        g = gray[0]
        special = [
            dict.fromkeys(FERPLUS_COLS, 0),  # no votes at all
            {**dict.fromkeys(FERPLUS_COLS, 0), "neutral": 5, "anger": -1},  # negative vote
            {**dict.fromkeys(FERPLUS_COLS, 0), "neutral": float("nan"), "anger": 3},  # NaN
            {**dict.fromkeys(FERPLUS_COLS, 0), "NF": 6, "unknown": 1, "neutral": 3},  # not a face
            {**dict.fromkeys(FERPLUS_COLS, 0), "neutral": 4, "sadness": 4, "fear": 2},  # tie: no majority
            {**dict.fromkeys(FERPLUS_COLS, 0), "contempt": 5, "disgust": 3, "anger": 2},  # contempt on top: no majority
        ]
        for v in special:
            rows.append({"image": _png(g), **v, "fer_usage": "PublicTest", "fer2013_label": "bogus"})
    cols = {"image": pa.array([r["image"] for r in rows], pa.binary())}
    for c in FERPLUS_COLS:
        cols[c] = pa.array([float(r[c]) for r in rows], pa.float64())
    cols["fer_usage"] = pa.array([r["fer_usage"] for r in rows])
    cols["fer2013_label"] = pa.array([r["fer2013_label"] for r in rows])
    return pa.table(cols)


@pytest.fixture(scope="module")
def votes_parquet(tmp_path_factory, face_crops) -> Path:
    p = tmp_path_factory.mktemp("votes") / "votes.parquet"
    pq.write_table(_votes_table(face_crops), p)
    return p


def test_vote_columns_become_distributions_with_majority_labels(votes_parquet):
    ds = load_dataset(votes_parquet, 48, "gray", where="fer_usage=PublicTest", hard_label="fer2013_label")
    rep = ds.report
    assert rep.skipped_votes == {"negative or non-finite votes": 2, "no vote on any of the 7 emotions": 1, "mostly unknown / not a face": 1}
    assert rep.filtered == 57  # the Training rows (k % 5 != 0 of 72)
    assert ds.targets.shape == (len(ds), 7)
    np.testing.assert_allclose(ds.targets.sum(1), 1.0, atol=1e-6)
    # the tie and the contempt-majority rows are kept (they train) but have no majority label
    assert (ds.labels == -1).sum() == 2
    tie = ds.targets[np.flatnonzero(ds.labels == -1)[0]]
    np.testing.assert_allclose(tie[[EMOTIONS.index("neutral"), EMOTIONS.index("sad"), EMOTIONS.index("fear")]], [0.4, 0.4, 0.2], atol=1e-6)
    contempt = ds.targets[np.flatnonzero(ds.labels == -1)[1]]  # contempt votes dropped, renormalised
    np.testing.assert_allclose(contempt[[EMOTIONS.index("disgust"), EMOTIONS.index("angry")]], [0.6, 0.4], atol=1e-6)
    lab = ds.labels[ds.labels >= 0]
    assert set(lab.tolist()) == {EMOTIONS.index("happy"), EMOTIONS.index("neutral")}
    assert ds.aux is not None and (ds.aux == -1).sum() == 2  # 'bogus' hard labels are unknown, not fatal
    assert ds.rows is not None and len(ds.rows) == len(ds)


def test_bad_vote_data_gives_clear_errors(tmp_path, face_crops):
    t = _votes_table(face_crops, n_per=1, extra_rows=False)
    p = tmp_path / "no_fear.parquet"
    pq.write_table(t.drop(["fear"]), p)
    with pytest.raises(DataError, match=r"none for \['fear'\]"):
        load_dataset(p, 48, "gray")
    p2 = tmp_path / "no_votes.parquet"
    pq.write_table(t.select(["image", "fer_usage"]), p2)
    with pytest.raises(DataError, match="vote column"):
        load_dataset(p2, 48, "gray")
    p3 = tmp_path / "text_votes.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("anger"), "anger", pa.array(["x"] * t.num_rows)), p3)
    with pytest.raises(DataError, match="numeric"):
        load_dataset(p3, 48, "gray")
    pq.write_table(t, tmp_path / "ok.parquet")
    with pytest.raises(DataError, match="--where column 'split'"):
        load_dataset(tmp_path / "ok.parquet", 48, "gray", where="split=train")
    with pytest.raises(DataError, match="no rows where"):
        load_dataset(tmp_path / "ok.parquet", 48, "gray", where="fer_usage=Nope")
    all_bad = t.set_column(t.schema.get_field_index("neutral"), "neutral", pa.array([-1.0] * t.num_rows))
    pq.write_table(all_bad, tmp_path / "neg.parquet")
    with pytest.raises(DataError, match="no usable vote rows"):
        load_dataset(tmp_path / "neg.parquet", 48, "gray")


def test_vote_metrics_definitions():
    t = np.array([[0.7, 0.3, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0.5, 0.5]], np.float64)
    exact = vote_metrics(t + 1e-12, t)
    assert exact["ece"] == pytest.approx(0.0, abs=1e-9)
    entropy = -np.mean([0.7 * np.log(0.7) + 0.3 * np.log(0.3), np.log(0.5)])
    assert exact["nll"] == pytest.approx(entropy, abs=1e-6)
    over = vote_metrics(np.array([[1.0, 0, 0, 0, 0, 0, 0]]) * 0.999 + 0.001 / 7, t[:1])
    assert over["ece"] == pytest.approx(abs(0.999 + 0.001 / 7 - 0.7), abs=1e-6)


def test_temperature_fit_recovers_a_known_temperature():
    from fer_batch.train.calibrate import fit_temperature

    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (400, 7))
    targets = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    over = np.exp(2.5 * z) / np.exp(2.5 * z).sum(1, keepdims=True)  # overconfident model: T = 2.5 undoes it
    t = fit_temperature(over.astype(np.float32), targets)
    assert t == pytest.approx(2.5, rel=0.02)
    np.testing.assert_allclose(apply_temperature(over, t), targets, atol=2e-3)
    assert (apply_temperature(over, t).argmax(1) == over.argmax(1)).all()  # never changes the top emotion


def test_two_head_training_on_votes_export_evaluate_and_calibrate(tmp_path, votes_parquet):
    """Soft targets + a second hard-label head, trained for real; exported (mixed heads) to ONNX with
    parity; evaluated with NLL/ECE, predictions and a reliability diagram; calibrated in the card,
    and the classifier applies that temperature."""
    from fer_batch.train.calibrate import calibrate
    from fer_batch.train.evaluate import format_report, run, write_outputs
    from fer_batch.train.export import export

    args = TrainArgs(data=str(votes_parquet), out=str(tmp_path / "run"), where="fer_usage=Training", val=str(votes_parquet),
                     val_where="fer_usage=PublicTest", hard_label="fer2013_label", hard_weight=0.5, hard_mode="head",
                     arch={"name": "vgg", "widths": [8, 16], "depth": 1, "dropout": 0.0},
                     preprocess={"size": 48, "crop": 40, "colour": "gray", "mean": [0.5], "std": [0.5]}, epochs=3, batch_size=8,
                     lr=0.05, threads=1, warmup_epochs=0.5, precision="fp32", channels_last=False, patience=50, seed=0,
                     label_smoothing=0.0)
    best = main(args)
    ck = load_checkpoint(best)
    hist = json.loads(ck["history"])
    assert {"val_nll", "val_ece", "val_acc_hard_head"} <= set(hist[-1])
    assert ck["model"]["head.2.weight"].shape[0] == 14  # two heads of 7
    model, spec, labels = model_from_checkpoint(ck, head_mix=0.75)
    assert isinstance(model, HeadMix) and model.mix == 0.75
    imgs = load_dataset(votes_parquet, 48, "gray", where="fer_usage=PublicTest").images
    p = predict(model, imgs, spec)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    a = predict(model_from_checkpoint(ck, head_mix=1.0)[0], imgs, spec)
    b = predict(model_from_checkpoint(ck, head_mix=0.0)[0], imgs, spec)
    np.testing.assert_allclose(p, 0.75 * a + 0.25 * b, atol=1e-5)

    mdir = tmp_path / "models"
    shutil.copytree(REPO / "models", mdir, ignore=shutil.ignore_patterns("retinaface*", "vgg_fer2013*", "dlib*"))
    card = export(str(best), "tiny_votes", mdir, head_mix=0.75, sample=imgs[:16])
    text = card.read_text()
    assert "head_mix: 0.75" in text and "/work/" not in text and str(tmp_path) not in text.split("recipe")[0]

    m = run(str(card), str(votes_parquet), where="fer_usage=PublicTest", models_dir=str(mdir), predictions=tmp_path / "pred.parquet")
    assert m["no_majority"] == 2 and m["n"] == len(imgs) - 2
    assert 0 <= m["ece"] <= 1 and m["nll"] > 0 and m["temperature"] == 1.0
    rep = format_report(m)
    assert rep.splitlines()[0].startswith("accuracy: ") and rep.splitlines()[1].startswith("macro_f1: ") and "nll: " in rep
    pred = pq.read_table(tmp_path / "pred.parquet").to_pandas()
    assert len(pred) == len(imgs) and list(pred.columns) == ["row", "label"] + [f"p_{e}" for e in EMOTIONS]
    np.testing.assert_allclose(pred[[f"p_{e}" for e in EMOTIONS]].to_numpy().sum(1), 1.0, atol=1e-5)
    write_outputs(m, tmp_path / "m.json", tmp_path / "m.confusion.png")
    for f in ("m.json", "m.confusion.png", "m.reliability.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert {"accuracy", "macro_f1", "per_class", "labels", "confusion", "nll", "ece"} <= set(json.loads((tmp_path / "m.json").read_text()))

    cal = calibrate(str(card), str(votes_parquet), where="fer_usage=PublicTest", models_dir=str(mdir))
    assert cal["after"]["nll"] <= cal["before"]["nll"] + 1e-6
    m2 = run(str(card), str(votes_parquet), where="fer_usage=PublicTest", models_dir=str(mdir))
    assert m2["temperature"] == pytest.approx(cal["temperature"], abs=1e-4)
    assert m2["nll"] == pytest.approx(cal["after"]["nll"], abs=2e-3) and m2["accuracy"] == m["accuracy"]
    m3 = run(str(card), str(votes_parquet), where="fer_usage=PublicTest", models_dir=str(mdir), calibrated=False)
    assert m3["nll"] == pytest.approx(m["nll"], abs=1e-6)


def test_init_from_a_shipped_onnx_ensemble_member_is_exact():
    """Both members of the shipped vgg_fer2013, read back from its ONNX file into PyTorch, average to
    the file's own output (BatchNorm re-created from calibration statistics is an identity of the
    folded convolution)."""
    import onnxruntime as ort

    from fer_batch.train.nets import VGGNet
    from fer_batch.train.onnx_init import init_vgg_from_onnx, resolve_onnx

    path, member = resolve_onnx("vgg_fer2013")
    assert member == 0
    g = torch.Generator().manual_seed(0)
    calib = torch.rand(128, 1, 40, 40, generator=g) * 2 - 1
    x = torch.rand(32, 1, 40, 40, generator=g) * 2 - 1
    ps = []
    for k, widths in ((0, (32, 64, 128, 256)), (1, (48, 96, 192, 384))):
        m = VGGNet(7, 1, widths=widths)
        init_vgg_from_onnx(m, path, k, calib)
        with torch.no_grad():
            ps.append(m.eval()(x).softmax(1))
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(0.5 * (ps[0] + ps[1]).numpy(), want, atol=1e-5)
    from fer_batch.errors import ModelError

    with pytest.raises(ModelError, match="do not match|shape"):
        init_vgg_from_onnx(VGGNet(7, 1, widths=(16, 32)), path, 0, calib)


def test_init_from_a_shipped_single_network_export_is_exact():
    """A single-network export (``vgg_ferplus_v2``: one two-head network, no ``members.K`` in its
    node names) reads back as member 0: its vote head reproduces the file's output."""
    import onnxruntime as ort

    from fer_batch.errors import ModelError
    from fer_batch.train.nets import VGGNet
    from fer_batch.train.onnx_init import init_vgg_from_onnx, resolve_onnx

    path, member = resolve_onnx("vgg_ferplus_v2#0")
    g = torch.Generator().manual_seed(0)
    calib = torch.rand(128, 1, 40, 40, generator=g) * 2 - 1
    x = torch.rand(32, 1, 40, 40, generator=g) * 2 - 1
    m = VGGNet(14, 1, widths=(32, 64, 128, 256))
    init_vgg_from_onnx(m, path, member, calib)
    with torch.no_grad():
        p = m.eval()(x)[:, :7].softmax(1).numpy()
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(p, want, atol=1e-5)
    with pytest.raises(ModelError, match="no ensemble member 1"):
        init_vgg_from_onnx(VGGNet(14, 1, widths=(32, 64, 128, 256)), path, 1, calib)
