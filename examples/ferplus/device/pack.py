"""Pack FER+ Training + PublicTest small enough to travel to a lent GPU machine, and unpack it there.

The `device` tool sends the working tree and at most 64 MiB in all; the tracked tree alone is
about 36 MiB and `ferplus.parquet` (lossless PNG, all splits) 59 MiB, and lossless re-encodings
do not fit either (PNG or WebP mosaics: about 52 MB). The teacher needs only the Training rows (to
learn and to be read on) and PublicTest (to choose its epoch), so ``pack`` keeps those rows and
stores the 48x48 faces as 16x16 mosaics (768x768 gray JPEG, so one header per 256 faces; 48 is a
multiple of JPEG's 8x8 blocks, so no block mixes two faces) at the highest quality that fits the
budget left after the tracked tree. ``unpack`` (on the device machine) writes the Parquet that
``fer-batch train`` reads: lossless PNG of the decoded faces, the 10 vote columns, ``fer_usage``
and ``src_row`` (the row in ``ferplus.parquet``, so the teacher's probabilities join back onto the
original lossless images here).

    python examples/ferplus/device/pack.py pack                       # here: .devdata/ferplus_dev.npz
    python3 examples/ferplus/device/pack.py unpack --out /tmp/fp.parquet   # there

``.devdata/`` is git-ignored; name it in the device call's ``carry``. Research-use data: never
commit the pack.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[3]
SHARED = Path(os.environ.get("FER_BATCH_SHARED", REPO.parent / "shared")) / "data"
VOTES = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF"]
SPLITS = ("Training", "PublicTest", "PrivateTest")
DEVICE_LIMIT = 64 * 2**20
SIDE, TILE = 48, 16  # face side; faces per mosaic row (TILE x TILE faces per mosaic)


def tracked_bytes(repo: Path) -> int:
    """Bytes of what every device call sends: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return sum((repo / p).stat().st_size for p in out.decode().split("\0") if p and (repo / p).is_file())


def to_mosaics(gray: np.ndarray, quality: int) -> list[bytes]:
    """(N, 48, 48) uint8 -> JPEG mosaics of TILE x TILE faces (the last one padded with black)."""
    per = TILE * TILE
    n = -(-len(gray) // per) * per
    g = np.zeros((n, SIDE, SIDE), np.uint8)
    g[: len(gray)] = gray
    out = []
    for i in range(0, n, per):
        m = g[i : i + per].reshape(TILE, TILE, SIDE, SIDE).transpose(0, 2, 1, 3).reshape(TILE * SIDE, TILE * SIDE)
        out.append(cv2.imencode(".jpg", m, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes())
    return out


def from_mosaics(blobs: list[bytes], n: int) -> np.ndarray:
    faces = []
    for b in blobs:
        m = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE)
        if m is None or m.shape != (TILE * SIDE, TILE * SIDE):
            raise ValueError("a mosaic of the pack does not decode to 768x768 gray")
        faces.append(m.reshape(TILE, SIDE, TILE, SIDE).transpose(0, 2, 1, 3).reshape(TILE * TILE, SIDE, SIDE))
    return np.concatenate(faces)[:n]


def pack(a: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    budget = int(a.budget_mb * 2**20) if a.budget_mb else DEVICE_LIMIT - tracked_bytes(REPO) - 2**20
    t = pq.read_table(a.data, columns=["image", "fer_usage", *VOTES])
    usage = np.asarray(t.column("fer_usage").to_pylist(), object)
    rows = np.sort(np.concatenate([np.flatnonzero(usage == s)[: a.limit or None] for s in a.splits.split(",")]))
    images = t.column("image").to_pylist()
    gray = np.stack([cv2.imdecode(np.frombuffer(images[r], np.uint8), cv2.IMREAD_GRAYSCALE) for r in rows])
    if gray.shape[1:] != (SIDE, SIDE):
        raise SystemExit(f"expected 48x48 faces, got {gray.shape[1:]}")
    for q in range(95, 69, -1):
        blobs = to_mosaics(gray, q)
        size = sum(map(len, blobs)) + 27 * len(rows)  # + src_row, usage, votes
        if size <= budget:
            break
    else:
        raise SystemExit(f"even JPEG quality 70 needs {size / 2**20:.1f} MiB; the budget is {budget / 2**20:.1f} MiB")
    err = float(np.abs(from_mosaics(blobs, len(rows)).astype(np.int16) - gray).mean())
    # float16 holds small integer votes exactly, and keeps NaN / negative votes for the reader to refuse
    votes = np.stack([np.asarray(t.column(v).to_numpy(zero_copy_only=False), np.float64) for v in VOTES], 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, mosaics=np.frombuffer(b"".join(blobs), np.uint8), lengths=np.asarray([len(b) for b in blobs], np.int64),
                 src_row=rows.astype(np.int32), usage=np.asarray([SPLITS.index(u) for u in usage[rows]], np.int8),
                 votes=votes[rows].astype(np.float16), quality=np.int32(q), source=np.asarray(Path(a.data).name))
    os.replace(tmp, out)
    print(f"{out}: {len(rows)} faces ({a.splits}), {len(blobs)} mosaics at JPEG quality {q}, mean |pixel error| "
          f"{err:.2f}, {out.stat().st_size / 2**20:.1f} MiB of a {budget / 2**20:.1f} MiB budget")


def unpack(a: argparse.Namespace) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    z = np.load(a.pack, allow_pickle=False)
    ends = np.cumsum(z["lengths"])
    raw = z["mosaics"].tobytes()
    blobs = [raw[e - n : e] for e, n in zip(ends, z["lengths"])]
    faces = from_mosaics(blobs, len(z["src_row"]))
    cols = {"image": pa.array([cv2.imencode(".png", f)[1].tobytes() for f in faces], pa.binary()),
            "src_row": pa.array(z["src_row"]), "fer_usage": pa.array([SPLITS[i] for i in z["usage"]])}
    cols.update({v: pa.array(z["votes"][:, j].astype(np.float32)) for j, v in enumerate(VOTES)})
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), out)
    print(f"{out}: {len(faces)} faces (JPEG quality {int(z['quality'])} in the pack)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: ferplus.parquet -> .devdata/ferplus_dev.npz")
    p.add_argument("--data", default=str(SHARED / "ferplus/ferplus.parquet"))
    p.add_argument("--out", default=str(REPO / ".devdata/ferplus_dev.npz"))
    p.add_argument("--splits", default="Training,PublicTest")
    p.add_argument("--budget-mb", type=float, default=0.0, help="MiB allowed (0: 64 MiB - the tracked tree - 1 MiB)")
    p.add_argument("--limit", type=int, default=0, help="only the first N rows of each split (smoke tests)")
    u = sub.add_parser("unpack", help="there: the pack -> a Parquet for fer-batch train")
    u.add_argument("--pack", default=str(REPO / ".devdata/ferplus_dev.npz"))
    u.add_argument("--out", required=True)
    a = ap.parse_args()
    pack(a) if a.cmd == "pack" else unpack(a)


if __name__ == "__main__":
    main()
