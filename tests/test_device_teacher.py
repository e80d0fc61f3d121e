"""The GPU-teacher route of issue 10 (examples/ferplus/device/), run end to end on the CPU.

pack (mosaic JPEG, within a byte budget) -> unpack -> teacher.sh (its SMOKE teachers, the same
`fer-batch train` path as on a lent GPU) -> teacher_probs.npz -> distill_data.py -> a Parquet that
`fer-batch train` reads as vote data with the blended targets. Small faces from insightface's t1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fer_batch.train.data import LoadReport, load_dataset, read_votes, vote_columns
from test_votes import FERPLUS_COLS, _votes_table  # tests/ is on sys.path (rootdir conftest)

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / "examples/ferplus/device"


def _run(*cmd, env=None) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_device_teacher_route_runs_end_to_end_on_cpu(tmp_path, face_crops):
    t = _votes_table(face_crops, n_per=8)
    usage = t.column("fer_usage").to_pylist()
    usage[-3] = "Training"  # the mostly-not-a-face row: distillation must skip it like the vote reader does
    t = t.set_column(t.column_names.index("fer_usage"), "fer_usage", pa.array(usage))
    data = tmp_path / "ferplus_like.parquet"
    pq.write_table(t, data)

    pack = tmp_path / "pack.npz"
    out = _run(sys.executable, DEV / "pack.py", "pack", "--data", data, "--out", pack, "--budget-mb", "0.05")
    assert "JPEG quality" in out
    unpacked = tmp_path / "unpacked.parquet"
    _run(sys.executable, DEV / "pack.py", "unpack", "--pack", pack, "--out", unpacked)
    u = pq.read_table(unpacked)
    src = u.column("src_row").to_numpy()
    assert sorted(src) == [i for i, s in enumerate(usage) if s in ("Training", "PublicTest")]
    # faces survive the mosaic JPEG closely; votes exactly (NaN and negative ones too, for the reader to refuse)
    orig = t.column("image").to_pylist()
    err = [np.abs(cv2.imdecode(np.frombuffer(u.column("image")[i].as_py(), np.uint8), 0).astype(int)
                  - cv2.imdecode(np.frombuffer(orig[r], np.uint8), 0)).mean() for i, r in enumerate(src)]
    assert max(err) < 6.0
    for c in FERPLUS_COLS:
        np.testing.assert_array_equal(u.column(c).to_numpy(), t.column(c).to_numpy()[src])

    res = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "DEV": "cpu", "OUT": str(res), "PACK": str(pack), "WORK": str(tmp_path / "work"),
           "PY": sys.executable}
    _run("bash", DEV / "teacher.sh", env=env)
    z = np.load(res / "teacher_probs.npz", allow_pickle=False)
    assert list(z["names"]) == ["smoke_resnet", "smoke_vgg"]
    emo, extra = vote_columns(t.column_names)
    _, _, readable = read_votes(u, emo, extra, LoadReport("u"))  # the rows the vote reader keeps
    assert z["probs"].shape == (2, int(readable.sum()), 7)
    np.testing.assert_allclose(z["probs"].astype(np.float32).sum(-1), 1.0, atol=2e-3)
    assert sorted(z["src_row"]) == sorted(src[readable])
    assert len(t) - 3 not in set(z["src_row"].tolist())  # the mostly-not-a-face Training row
    assert (res / "smoke_resnet.history.jsonl").stat().st_size > 0

    dist = tmp_path / "distill.parquet"
    _run(sys.executable, DEV / "distill_data.py", res / "teacher_probs.npz", "--data", data, "--out", dist, "--alpha", "0.25")
    d = pq.read_table(dist)
    train_rows = [int(r) for r, s in zip(z["src_row"], z["usage"]) if s == "Training"]
    votes, _, ok = read_votes(t.take(pa.array(train_rows)), emo, extra, LoadReport("t"))
    assert d.num_rows == int(ok.sum()) == len(train_rows) > 0
    teach = z["probs"][:, np.asarray([s == "Training" for s in z["usage"]])].astype(np.float64).mean(0)[ok]
    want = 0.25 * votes[ok] + 0.75 * teach / teach.sum(1, keepdims=True)
    got = np.stack([d.column(f"p_{e}").to_numpy() for e in ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")], 1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    ds = load_dataset(dist, 48, "gray", hard_label="fer2013_label")  # read back as vote data for `fer-batch train`
    assert ds.targets is not None and len(ds) == d.num_rows
    np.testing.assert_allclose(ds.targets, want / want.sum(1, keepdims=True), atol=1e-5)
