"""Training side: datasets from real face crops, a tiny real training run, resume, export, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fer_batch.errors import DataError, ModelError
from fer_batch.train.data import load_dataset, split_train_val
from fer_batch.train.engine import TrainArgs, load_checkpoint, main
from fer_batch.types import EMOTIONS

REPO = Path(__file__).resolve().parents[1]
TINY_ARCH = {"name": "vgg", "widths": [8, 16], "depth": 1, "dropout": 0.0}
PRE = {"size": 48, "crop": 40, "colour": "gray", "mean": [0.5], "std": [0.5]}


def _variants(g: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Real-face variants: flips, small shifts, brightness changes (all distinct pixels)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = g[:, ::-1] if i % 2 else g
        dx, dy = rng.integers(-3, 4, 2)
        im = np.roll(np.roll(im, dx, 1), dy, 0).astype(np.float32)
        im = np.clip(im * rng.uniform(0.8, 1.2) + rng.uniform(-10, 10), 0, 255).astype(np.uint8)
        out.append(im)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory, face_crops) -> Path:
    """happiness/ (alias of happy) and neutral/ with 16 real face crops each."""
    gray, smiling = face_crops
    root = tmp_path_factory.mktemp("faces")
    for cls, faces in (("happiness", gray[smiling]), ("neutral", gray[~smiling])):
        (root / cls).mkdir()
        k = 0
        for j, g in enumerate(faces):
            for v in _variants(g, 16 // len(faces) + 1, seed=j + (100 if cls == "neutral" else 0)):
                cv2.imwrite(str(root / cls / f"{k:03d}.png"), v)
                k += 1
    return root


def _args(data: Path, out: Path, **kw) -> TrainArgs:
    base = dict(data=str(data), out=str(out), arch=dict(TINY_ARCH), preprocess=dict(PRE), epochs=2, batch_size=8, lr=0.05,
                val_fraction=0.25, threads=1, warmup_epochs=0.5, precision="fp32", channels_last=False, patience=50, seed=3)
    base.update(kw)
    return TrainArgs(**base)


def test_folder_dataset_maps_aliases_and_splits(folder):
    ds = load_dataset(folder, 48, "gray")
    assert ds.images.shape[1:] == (48, 48, 1) and ds.images.dtype == np.uint8
    assert ds.present() == {"happy", "neutral"}
    tr, va = split_train_val(ds, 0.25, seed=0)
    assert len(tr) + len(va) == len(ds) and va.present() == {"happy", "neutral"}
    assert not set(tr.keys) & set(va.keys)


def test_tiny_training_run_checkpoint_and_resume(folder, tmp_path):
    out = tmp_path / "run"
    best = main(_args(folder, out))
    assert best.name == "best.pt" and (out / "last.pt").is_file()
    ck = load_checkpoint(out / "last.pt")
    assert ck["format"] == "fer-batch-checkpoint/1"
    assert ck["labels"] == list(EMOTIONS)
    args = json.loads(ck["args"])
    assert args["data"] == str(folder) and args["arch"] == TINY_ARCH and args["epochs"] == 2
    assert json.loads(ck["preprocess"])["crop"] == 40
    hist = json.loads(ck["history"])
    assert [h["epoch"] for h in hist] == [1, 2] and all(0 <= h["val_acc"] <= 1 for h in hist)
    assert set(ck["model"]) >= {"head.2.weight", "features.0.weight"}
    before = {k: v.clone() for k, v in ck["model"].items()}
    # resume: continues at epoch 3 from the saved state (history kept, weights move on)
    main(_args(folder, out, epochs=3), resume=True)
    ck3 = load_checkpoint(out / "last.pt")
    hist3 = json.loads(ck3["history"])
    assert [h["epoch"] for h in hist3] == [1, 2, 3] and hist3[:2] == hist
    assert not torch.equal(ck3["model"]["features.0.weight"], before["features.0.weight"])
    assert (out / "history.jsonl").read_text().count("\n") == 3


def test_export_parity_and_classifier(folder, tmp_path, face_crops):
    from fer_batch.classify import EmotionClassifier
    from fer_batch.config import ClassifyConfig
    from fer_batch.train.export import export

    out = tmp_path / "run"
    main(_args(folder, out, epochs=1))
    mdir = tmp_path / "models"
    shutil.copytree(REPO / "models", mdir)
    gray, _ = face_crops
    card = export(str(out / "best.pt"), "tiny_test", mdir, sample=gray[..., None])  # parity check inside
    text = card.read_text()
    assert "recipe:" in text and "align_template" in text and "default: false" in text
    clf = EmotionClassifier(ClassifyConfig(model=str(card)), threads=1)
    p = clf(np.repeat(gray[..., None], 3, axis=-1))
    assert p.shape == (6, 7)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)


def test_ensemble_export_averages_members_in_one_onnx(folder, tmp_path, face_crops):
    import onnxruntime as ort
    import yaml

    from fer_batch.preprocess import PreprocessSpec, prepare
    from fer_batch.train.engine import model_from_checkpoint
    from fer_batch.train.export import export

    a, b = tmp_path / "a", tmp_path / "b"
    main(_args(folder, a, epochs=1, seed=1))
    main(_args(folder, b, epochs=1, seed=2, arch=dict(TINY_ARCH, dropout=0.1)))
    mdir = tmp_path / "models"
    shutil.copytree(REPO / "models", mdir)
    gray, _ = face_crops
    card_path = export([str(a / "best.pt"), str(b / "best.pt")], "tiny_pair", mdir, sample=gray[..., None])
    card = yaml.safe_load(card_path.read_text())
    members = card["provenance"]["members"]
    assert len(members) == 2 and members[0]["checkpoint_sha256"] != members[1]["checkpoint_sha256"]
    assert len(card["recipe"].split(" && ")) == 2 and "fer-batch export" in card["recipe"]
    # the ONNX output is the mean of the two members' probabilities
    spec = PreprocessSpec.from_dict(card["preprocess"])
    x = prepare(gray[..., None], spec)
    got = ort.InferenceSession(str(mdir / card["file"]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    want = []
    for run in (a, b):
        m, _, _ = model_from_checkpoint(load_checkpoint(run / "best.pt"))
        with torch.no_grad():
            want.append(m(torch.from_numpy(x)).softmax(1).numpy())
    np.testing.assert_allclose(got, (want[0] + want[1]) / 2, atol=1e-5)
    # the same ensemble with its weights stored as float16: half the file, same graph outputs within 2e-3
    small = yaml.safe_load(export([str(a / "best.pt"), str(b / "best.pt")], "tiny_pair16", mdir, store_fp16=True,
                                  sample=gray[..., None]).read_text())
    assert small["provenance"]["weights_storage"].startswith("float16 (cast")
    assert (mdir / small["file"]).stat().st_size < 0.8 * (mdir / card["file"]).stat().st_size  # graph overhead of a tiny net
    import onnx

    conv_w = [i for i in onnx.load(str(mdir / small["file"])).graph.initializer if len(i.dims) == 4]
    assert conv_w and all(i.data_type == onnx.TensorProto.FLOAT16 for i in conv_w)
    got16 = ort.InferenceSession(str(mdir / small["file"]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got16, got, atol=2e-3)
    # members with different preprocessing cannot be averaged
    c = tmp_path / "c"
    main(_args(folder, c, epochs=1, preprocess=dict(PRE, crop=44)))
    with pytest.raises(ModelError, match="cannot join an ensemble"):
        export([str(a / "best.pt"), str(c / "best.pt")], "tiny_bad", mdir)


def test_csv_and_parquet_datasets(tmp_path, face_crops):
    import pandas as pd

    gray, smiling = face_crops
    rows = [{"emotion": 3 if s else 6, "pixels": " ".join(map(str, g.ravel())), "Usage": "Training"} for g, s in zip(gray, smiling)]
    rows.append({"emotion": 6, "pixels": "1 2 3", "Usage": "Training"})  # not a square image: corrupt
    pd.DataFrame(rows).to_csv(tmp_path / "fer.csv", index=False)
    ds = load_dataset(tmp_path / "fer.csv", 48, "gray")
    assert len(ds) == 6 and len(ds.report.corrupt) == 1
    assert [EMOTIONS[i] for i in ds.labels] == ["happy" if s else "neutral" for s in smiling]
    img = [cv2.imencode(".jpg", g)[1].tobytes() for g in gray] + [b"not a jpeg"]
    pd.DataFrame({"image": img, "label": ["happy" if s else "neutral" for s in smiling] + ["sad"]}).to_parquet(tmp_path / "f.parquet")
    ds2 = load_dataset(tmp_path / "f.parquet", 48, "gray")
    assert len(ds2) == 6 and ds2.report.corrupt == ["row 6"]


def test_corrupt_image_is_counted_not_fatal(folder, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(folder, d)
    (d / "neutral" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    ds = load_dataset(d, 48, "gray")
    assert len(ds.report.corrupt) == 1 and "broken.jpg" in ds.report.corrupt[0]
    assert len(ds) == len(load_dataset(folder, 48, "gray"))
    main(_args(d, tmp_path / "run", epochs=1))  # training goes on


def test_bad_datasets_raise_data_errors(folder, tmp_path):
    # empty class folder
    d = tmp_path / "empty_class"
    shutil.copytree(folder, d)
    (d / "sad").mkdir()
    with pytest.raises(DataError, match="empty class"):
        load_dataset(d, 48, "gray")
    # single class
    one = tmp_path / "one"
    shutil.copytree(folder / "neutral", one / "neutral")
    with pytest.raises(DataError, match="only one class"):
        main(_args(one, tmp_path / "r1"))
    # unknown label: error, or dropped on request
    unk = tmp_path / "unknown"
    shutil.copytree(folder, unk)
    shutil.copytree(folder / "neutral", unk / "contempt")
    with pytest.raises(DataError, match="contempt"):
        load_dataset(unk, 48, "gray")
    ds = load_dataset(unk, 48, "gray", drop_unknown=True)
    assert ds.report.dropped_unknown == len(list((folder / "neutral").iterdir()))
    # train and validation label sets differ
    with pytest.raises(DataError, match="label sets differ"):
        main(_args(folder, tmp_path / "r2", val=str(one)))
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope", 48, "gray")


def test_untrusted_pickle_is_refused(tmp_path):
    class Payload:  # any non-allow-listed object needs full unpickling
        def __reduce__(self):
            return (print, ("would run at load time",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "fer-batch-checkpoint/1", "model": {}, "x": Payload()}, bad)
    with pytest.raises(ModelError, match="refused"):
        load_checkpoint(bad)
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError):
        load_checkpoint(tmp_path / "junk.pt")


def test_cli_evaluate_prints_metrics(folder, tmp_path, capsys):
    from fer_batch.cli import main as cli_main

    rc = cli_main(["evaluate", "mini_xception_fer", str(folder), "--threads", "1", "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "accuracy: " in out and "macro_f1: " in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n"] == len(load_dataset(folder, 48, "gray")) and len(m["confusion"]) == 7
    assert (tmp_path / "m.confusion.png").is_file()
    assert f"accuracy: {m['accuracy']:.4f}" in out


def test_transfer_from_torchvision_weights_with_freeze(folder, tmp_path):
    """``--init`` a torchvision architecture from a local weights file; the head trains alone while frozen."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v3_small(weights=None)
    wfile = tmp_path / "mnv3s.pth"
    torch.save(tv.state_dict(), wfile)  # a plain state dict, as torchvision ships them
    out = tmp_path / "run"
    main(_args(folder, out, arch={"name": "tv:mobilenet_v3_small"}, init=str(wfile), epochs=1, freeze_epochs=1,
               backbone_lr_mult=0.1, preprocess={"size": 48, "crop": 40, "colour": "gray", "mean": [0.5], "std": [0.5]}))
    sd = load_checkpoint(out / "last.pt")["model"]
    first = tv.state_dict()["features.0.0.weight"]
    # the RGB stem was folded into the gray stem (sum over colour) and stayed frozen
    assert torch.allclose(sd["features.0.0.weight"], first.sum(1, keepdim=True))
    assert torch.equal(sd["features.3.block.0.0.weight"], tv.state_dict()["features.3.block.0.0.weight"])
    assert sd["classifier.3.weight"].shape == (7, 1024)
    hist = json.loads(load_checkpoint(out / "last.pt")["history"])
    assert hist[0]["frozen"] is True


def test_kept_epochs_are_averaged_into_one_checkpoint(folder, tmp_path, face_crops):
    """--keep-epochs keeps every epoch; examples/ferplus/average_weights.py means them (BatchNorm re-estimated)."""
    import subprocess
    import sys

    from fer_batch.train.engine import model_from_checkpoint, predict

    out = tmp_path / "run"
    main(_args(folder, out, epochs=3, keep_epochs=True))
    kept = sorted((out / "epochs").glob("ep*.pt"))
    assert [p.name for p in kept] == ["ep01.pt", "ep02.pt", "ep03.pt"]
    cks = [load_checkpoint(p) for p in kept]
    assert torch.equal(cks[-1]["model"]["features.0.weight"], load_checkpoint(out / "last.pt")["model"]["features.0.weight"])
    avg = tmp_path / "avg.pt"
    r = subprocess.run([sys.executable, str(REPO / "examples/ferplus/average_weights.py"), *map(str, kept[1:]), "--data", str(folder),
                        "--out", str(avg)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(avg)
    mean = (cks[1]["model"]["features.0.weight"] + cks[2]["model"]["features.0.weight"]) / 2
    torch.testing.assert_close(ck["model"]["features.0.weight"], mean)
    assert [c["epoch"] for c in json.loads(ck["averaged_from"])["checkpoints"]] == [2, 3]
    assert "optimizer" not in ck and ck["labels"] == list(EMOTIONS)
    # BatchNorm statistics are re-estimated on the data, not averaged
    bn = "features.1.running_mean"
    assert not torch.allclose(ck["model"][bn], (cks[1]["model"][bn] + cks[2]["model"][bn]) / 2)
    model, spec, _ = model_from_checkpoint(ck)
    gray, _ = face_crops
    p = predict(model, gray[..., None], spec)
    assert p.shape == (len(gray), 7)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
