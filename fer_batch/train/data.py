"""Datasets for training and evaluation: image folders, Parquet (image bytes + label), FER2013 CSV.

Every format is decoded **once** into an in-memory ``uint8`` array (N, H, W, C) at a fixed size,
with integer labels in ``fer_batch.types.EMOTIONS`` order. Augmentation then works on tensors
(see :mod:`fer_batch.train.augment`), so no image decoding happens in the training loop.

Bad input: unreadable or corrupt images are counted and reported (``LoadReport``), not fatal;
unknown labels raise ``DataError`` unless ``drop_unknown`` is set; an empty class, a single-class
dataset, and mismatched label sets between train and validation raise ``DataError``.

Label distributions (crowd votes, e.g. FER+): a Parquet with one numeric column per emotion
(named by the emotion or an alias: ``neutral, happiness, surprise, sadness, anger, disgust,
fear``; or ``p_<emotion>``) is read as soft targets, see :func:`read_votes`. The documented
choices for the 7-emotion output:

* ``contempt``, ``unknown`` and ``NF`` (not a face) columns are read when present but are not
  emotions of the output: their votes are dropped and the 7 emotion votes renormalised;
* a row where ``unknown`` + ``NF`` hold more than half of all votes is skipped (counted);
* a row with a negative or non-finite vote, or with no vote on any of the 7 emotions, is
  skipped (counted); a missing emotion column is an error naming it;
* the hard label of a vote row (for accuracy and stratification) is the *majority*: the unique
  top vote over all vote columns, when it is one of the 7 emotions; otherwise -1 (the row
  still trains on its distribution but is left out of accuracy).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fer_batch.errors import DataError
from fer_batch.models import canonical_label
from fer_batch.types import EMOTIONS

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
# FER2013 CSV ``emotion`` codes: 0 Angry, 1 Disgust, 2 Fear, 3 Happy, 4 Sad, 5 Surprise, 6 Neutral.
FER2013_CODES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@dataclass
class LoadReport:
    """What happened while reading a dataset (counts of skipped items and why)."""

    source: str
    n_read: int = 0
    corrupt: list[str] = field(default_factory=list)
    unknown_labels: Counter = field(default_factory=Counter)
    dropped_unknown: int = 0
    skipped_votes: Counter = field(default_factory=Counter)
    filtered: int = 0

    def summary(self) -> str:
        parts = [f"{self.source}: {self.n_read} images"]
        if self.filtered:
            parts.append(f"{self.filtered} rows outside the --where filter")
        if self.skipped_votes:
            parts.append(f"{sum(self.skipped_votes.values())} vote rows skipped {dict(self.skipped_votes)}")
        if self.corrupt:
            ex = ", ".join(self.corrupt[:3]) + (" ..." if len(self.corrupt) > 3 else "")
            parts.append(f"{len(self.corrupt)} unreadable/corrupt skipped ({ex})")
        if self.dropped_unknown:
            parts.append(f"{self.dropped_unknown} with unknown labels dropped {dict(self.unknown_labels)}")
        return "; ".join(parts)


@dataclass
class ImageDataset:
    """Decoded images and labels.

    Attributes:
        images: (N, H, W, C) uint8; C = 1 (gray) or 3 (RGB).
        labels: (N,) int64 indices into ``EMOTIONS``.
        keys: per-image identity used to keep duplicates on one side of a split and to find
            test images duplicated in training (``pixel_md5`` where the data has it, else the
            md5 of the decoded pixels).
        report: the load report.
        targets: (N, 7) float32 label distributions (rows sum to 1) for vote data, else None.
            With targets, ``labels`` is the majority label and -1 where there is none.
        aux: (N,) int64 second hard label (``--hard-label COLUMN``), -1 where unknown, or None.
    """

    images: np.ndarray
    labels: np.ndarray
    keys: np.ndarray
    report: LoadReport
    targets: np.ndarray | None = None
    aux: np.ndarray | None = None
    rows: np.ndarray | None = None  # each image's row in the source file (Parquet), for --predictions

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray) -> "ImageDataset":
        return ImageDataset(self.images[idx], self.labels[idx], self.keys[idx], self.report,
                            None if self.targets is None else self.targets[idx], None if self.aux is None else self.aux[idx],
                            None if self.rows is None else self.rows[idx])

    def class_counts(self) -> np.ndarray:
        """Images per class; for vote data the summed distributions (soft counts)."""
        if self.targets is not None:
            return self.targets.sum(0).astype(np.float64)
        return np.bincount(self.labels[self.labels >= 0], minlength=len(EMOTIONS))

    def present(self) -> set[str]:
        if self.targets is not None:
            return {EMOTIONS[i] for i in np.flatnonzero(self.targets.sum(0) > 0)}
        return {EMOTIONS[i] for i in np.unique(self.labels) if i >= 0}

    def labelled(self) -> "ImageDataset":
        """Only the rows with a hard label (the majority for vote data)."""
        return self.subset(np.flatnonzero(self.labels >= 0))


def _decode(buf: bytes | np.ndarray, size: int, colour: str) -> np.ndarray | None:
    """Decode encoded image bytes to (size, size, C) uint8, or None when unreadable."""
    arr = np.frombuffer(buf, np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) else buf
    if arr.size == 0:
        return None
    flag = cv2.IMREAD_GRAYSCALE if colour == "gray" else cv2.IMREAD_COLOR
    img = cv2.imdecode(arr, flag)
    if img is None or img.size == 0:
        return None
    return _fit(img, size, colour)


def _fit(img: np.ndarray, size: int, colour: str) -> np.ndarray:
    """Resize to size x size (size 0: keep the native size) and order channels for ``colour``."""
    if size and (img.shape[0] != size or img.shape[1] != size):
        interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
        img = cv2.resize(img, (size, size), interpolation=interp)
    if colour == "gray":
        return img.reshape(img.shape[0], img.shape[1], 1)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if colour == "rgb" else img


def _map_labels(raw: list[str], report: LoadReport, drop_unknown: bool) -> np.ndarray:
    """Canonical label indices; -1 for unknown labels (dropped later) or DataError."""
    out = np.empty(len(raw), np.int64)
    cache: dict[str, int] = {}
    for i, lbl in enumerate(raw):
        if lbl not in cache:
            c = canonical_label(lbl)
            cache[lbl] = EMOTIONS.index(c) if c else -1
        out[i] = cache[lbl]
        if out[i] < 0:
            report.unknown_labels[str(lbl)] += 1
    if report.unknown_labels and not drop_unknown:
        raise DataError(
            f"{report.source}: labels that map onto none of the 7 emotions {list(EMOTIONS)}: "
            f"{dict(report.unknown_labels)} (rename them, or pass --drop-unknown to skip those images)"
        )
    report.dropped_unknown = int((out < 0).sum())
    return out


def _finish(images: list, labels: np.ndarray, keys: list, report: LoadReport, ok: np.ndarray | None = None,
            targets: np.ndarray | None = None, aux: np.ndarray | None = None) -> ImageDataset:
    ok = np.array([im is not None for im in images], bool) & (labels >= 0 if ok is None else ok)
    if not ok.any():
        raise DataError(f"{report.source}: no usable images ({report.summary()})")
    kept = [images[i] for i in np.flatnonzero(ok)]
    if len({im.shape for im in kept}) == 1:
        arr = np.stack(kept)
    else:  # native sizes (size=0): an object array of (H, W, C) images
        arr = np.empty(len(kept), dtype=object)
        arr[:] = kept
    keys_arr = np.array([keys[i] for i in np.flatnonzero(ok)], dtype=object)
    report.n_read = int(ok.sum())
    if report.corrupt or report.dropped_unknown or report.skipped_votes:
        log.warning(report.summary())
    else:
        log.info(report.summary())
    return ImageDataset(arr, labels[ok], keys_arr, report, None if targets is None else targets[ok], None if aux is None else aux[ok])


def _md5(img: np.ndarray | None) -> str:
    import hashlib

    return hashlib.md5(img.tobytes()).hexdigest() if img is not None else ""


NON_EMOTION_VOTES = ("contempt", "unknown", "nf")  # read when present, never an output class
NOT_A_FACE_VOTES = ("unknown", "nf")


def vote_columns(names: list[str]) -> tuple[dict[int, str], list[str]]:
    """Emotion index -> vote column, and the non-emotion vote columns present (FER+ names).

    A column counts as a vote column when its name (or the part after ``p_``) is an emotion or
    an alias (``happiness``, ``anger`` ...). ``label`` and other columns are ignored.
    """
    emo: dict[int, str] = {}
    for n in names:
        base = n[2:] if n.lower().startswith("p_") else n
        c = canonical_label(base)
        if c is not None and n not in ("label",):
            emo.setdefault(EMOTIONS.index(c), n)
    extra = [n for n in names if n.lower() in NON_EMOTION_VOTES]
    return emo, extra


def read_votes(table, emo: dict[int, str], extra: list[str], report: LoadReport) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(targets (N, 7), majority labels (N,), ok mask (N,)) from vote columns; see the module doc."""
    n = table.num_rows
    v = np.zeros((n, len(EMOTIONS)), np.float64)
    for i, col in emo.items():
        v[:, i] = np.asarray(table.column(col).to_numpy(zero_copy_only=False), np.float64)
    x = np.stack([np.asarray(table.column(c).to_numpy(zero_copy_only=False), np.float64) for c in extra], 1) if extra else np.zeros((n, 0))
    bad = ~np.isfinite(v).all(1) | ~np.isfinite(x).all(1) | (np.nan_to_num(v, nan=-1) < 0).any(1) | (np.nan_to_num(x, nan=-1) < 0).any(1)
    v = np.where(np.isfinite(v), v, 0.0)
    x = np.where(np.isfinite(x), x, 0.0)
    s7 = v.sum(1)
    nf_cols = [j for j, c in enumerate(extra) if c.lower() in NOT_A_FACE_VOTES]
    nf = x[:, nf_cols].sum(1) if nf_cols else np.zeros(n)
    total = s7 + x.sum(1)
    empty = ~bad & (s7 <= 0)
    not_face = ~bad & ~empty & (nf > total / 2)
    for name, m in (("negative or non-finite votes", bad), ("no vote on any of the 7 emotions", empty),
                    ("mostly unknown / not a face", not_face)):
        if m.any():
            report.skipped_votes[name] += int(m.sum())
    ok = ~(bad | empty | not_face)
    targets = (v / np.maximum(s7, 1e-12)[:, None]).astype(np.float32)
    allv = np.concatenate([v, x], 1)
    top = allv.max(1, keepdims=True)
    unique_top = (allv == top).sum(1) == 1
    arg = allv.argmax(1)
    labels = np.where(unique_top & (arg < len(EMOTIONS)) & ok, arg, -1).astype(np.int64)
    return targets, labels, ok


def _parse_where(where: str | None, cols: set[str], path: Path) -> tuple[str, set[str]] | None:
    if not where:
        return None
    if "=" not in where:
        raise DataError(f"--where: expected COLUMN=VALUE[,VALUE...], got {where!r}")
    col, vals = where.split("=", 1)
    col = col.strip()
    if col not in cols:
        raise DataError(f"{path}: --where column {col!r} not in the data (columns: {sorted(cols)})")
    return col, {v.strip() for v in vals.split(",") if v.strip()}


def load_parquet(path: Path, size: int, colour: str, drop_unknown: bool, where: str | None = None,
                 hard_label: str | None = None) -> ImageDataset:
    """Parquet with ``image`` bytes and a ``label`` column, or one vote column per emotion (soft targets)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = list(pf.schema_arrow.names)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read as Parquet: {e}") from e
    cols = set(names)
    emo, extra = vote_columns(names)
    votes = len(emo) > 0
    if "image" not in cols or not ("label" in cols or votes):
        raise DataError(f"{path}: Parquet needs an 'image' column (encoded bytes) and either 'label' or one vote column "
                        f"per emotion ({', '.join(EMOTIONS)}; FER+ names accepted); it has {sorted(cols)}")
    if votes and len(emo) < len(EMOTIONS):
        missing = [EMOTIONS[i] for i in range(len(EMOTIONS)) if i not in emo]
        raise DataError(f"{path}: vote columns found for {sorted(emo.values())} but none for {missing}: "
                        "every emotion needs its vote column (0 where nobody chose it)")
    if hard_label and hard_label not in cols:
        raise DataError(f"{path}: --hard-label column {hard_label!r} not in the data (columns: {sorted(cols)})")
    flt = _parse_where(where, cols, path)
    want = ["image"] + (list(emo.values()) + extra if votes else ["label"])
    want += [c for c in ("pixel_md5",) if c in cols] + ([hard_label] if hard_label else []) + ([flt[0]] if flt else [])
    try:
        table = pf.read(columns=list(dict.fromkeys(want)))
    except Exception as e:
        raise DataError(f"{path}: cannot read columns {want}: {e}") from e
    report = LoadReport(str(path))
    rows = np.arange(table.num_rows)
    if flt:
        keep = np.array([str(v) in flt[1] for v in table.column(flt[0]).to_pylist()], bool)
        rows = np.flatnonzero(keep)
        report.filtered = int((~keep).sum())
        table = table.filter(keep)
        if table.num_rows == 0:
            raise DataError(f"{path}: no rows where {where}")
    targets = None
    if votes:
        try:
            targets, labels, ok = read_votes(table, emo, extra, report)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: vote columns must be numeric: {e}") from e
        if not ok.any():
            raise DataError(f"{path}: no usable vote rows ({dict(report.skipped_votes)})")
    else:
        labels = _map_labels([str(x) for x in table.column("label").to_pylist()], report, drop_unknown)
        ok = labels >= 0
    aux = None
    if hard_label:
        aux = np.array([EMOTIONS.index(c) if (c := canonical_label(str(x))) else -1 for x in table.column(hard_label).to_pylist()], np.int64)
    images, keys = [], []
    md5s = table.column("pixel_md5").to_pylist() if "pixel_md5" in cols else None
    for i, buf in enumerate(table.column("image").to_pylist()):
        img = None
        if ok[i]:
            img = _decode(buf or b"", size, colour)
            if img is None:
                report.corrupt.append(f"row {i}")
        images.append(img)
        keys.append(md5s[i] if md5s else _md5(img))
    ds = _finish(images, labels, keys, report, ok=ok, targets=targets, aux=aux)
    ds.rows = rows[np.array([im is not None for im in images], bool) & ok]
    return ds


def load_csv(path: Path, size: int, colour: str, drop_unknown: bool) -> ImageDataset:
    """FER2013 CSV: ``emotion`` (0..6, FER2013 code order) or ``label`` (names), ``pixels``."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read as CSV: {e}") from e
    if "pixels" not in df.columns or not ({"emotion", "label"} & set(df.columns)):
        raise DataError(f"{path}: a FER2013 CSV needs 'pixels' and 'emotion' (or 'label') columns; it has {list(df.columns)}")
    if "label" in df.columns:
        raw = [str(x) for x in df["label"]]
    else:
        raw = [FER2013_CODES[int(v)] if str(v).isdigit() and int(v) < 7 else str(v) for v in df["emotion"]]
    report = LoadReport(str(path))
    labels = _map_labels(raw, report, drop_unknown)
    images, keys = [], []
    for i, px in enumerate(df["pixels"].astype(str)):
        img = None
        if labels[i] >= 0:
            try:
                v = np.array(px.split(), dtype=np.float32)
                side = int(round(np.sqrt(v.size)))
                if side * side != v.size or side == 0 or v.min() < 0 or v.max() > 255:
                    raise ValueError("not a square 8-bit image")
                g = v.reshape(side, side).astype(np.uint8)
                img = _fit(g, size, colour)
            except ValueError:
                report.corrupt.append(f"row {i}")
        images.append(img)
        keys.append(_md5(img))
    return _finish(images, labels, keys, report)


def load_folder(path: Path, size: int, colour: str, drop_unknown: bool) -> ImageDataset:
    """One sub-folder per class (``happy/``, ``anger/`` ...); images anywhere below it."""
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(f"{path}: an image-folder dataset needs one sub-folder per class; found none")
    report = LoadReport(str(path))
    raw, files = [], []
    for d in subdirs:
        fs = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        if not fs:
            raise DataError(f"{path}: class folder {d.name!r} holds no images (empty class)")
        raw += [d.name] * len(fs)
        files += fs
    labels = _map_labels(raw, report, drop_unknown)
    images, keys = [], []
    for i, f in enumerate(files):
        img = None
        if labels[i] >= 0:
            img = _decode(np.fromfile(f, np.uint8), size, colour)
            if img is None:
                report.corrupt.append(str(f.relative_to(path)))
        images.append(img)
        keys.append(_md5(img))
    ds = _finish(images, labels, keys, report)
    for d in subdirs:  # a class folder whose images are all unreadable is an empty class too
        c = canonical_label(d.name)
        if c and EMOTIONS.index(c) not in set(ds.labels.tolist()):
            raise DataError(f"{path}: class folder {d.name!r} has no readable image (empty class)")
    return ds


def load_dataset(data: str | Path, size: int = 48, colour: str = "gray", drop_unknown: bool = False,
                 where: str | None = None, hard_label: str | None = None) -> ImageDataset:
    """Load DATA (folder, ``.parquet`` or ``.csv``) decoded to (N, size, size, C) uint8.

    ``colour``: gray | rgb | bgr. ``size`` 0 keeps native sizes (an object array when they differ).
    ``where`` (``COLUMN=V1,V2``) keeps only matching rows and ``hard_label`` names a second
    label column (both Parquet only).
    """
    p = Path(data)
    if colour not in ("gray", "rgb", "bgr"):
        raise DataError(f"colour must be gray, rgb or bgr, got {colour!r}")
    if not p.exists():
        raise DataError(f"{p}: dataset not found")
    if p.is_dir():
        ds = load_folder(p, size, colour, drop_unknown)
    elif (where or hard_label) and p.suffix.lower() != ".parquet":
        raise DataError(f"{p}: --where and --hard-label work on Parquet data only")
    elif p.suffix.lower() == ".parquet":
        ds = load_parquet(p, size, colour, drop_unknown, where, hard_label)
    elif p.suffix.lower() == ".csv":
        ds = load_csv(p, size, colour, drop_unknown)
    else:
        raise DataError(f"{p}: expected an image-folder tree, a .parquet or a .csv file")
    return ds


def check_trainable(train: ImageDataset, val: ImageDataset | None = None) -> None:
    """DataError for a single-class dataset or for different label sets in train and val."""
    present = train.present()
    if len(present) < 2:
        raise DataError(f"{train.report.source}: only one class present ({sorted(present)}); need at least two")
    if val is not None:
        vp = val.present()
        if train.targets is not None or val.targets is not None:  # distributions: any class may carry a little mass
            if vp - present:
                log.warning("validation votes name classes the training votes never do: %s", sorted(vp - present))
            return
        if vp != present:
            raise DataError(
                f"label sets differ between train ({sorted(present)}) and validation ({sorted(vp)}): "
                f"only in train {sorted(present - vp)}, only in validation {sorted(vp - present)}"
            )


def split_train_val(ds: ImageDataset, val_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Stratified split by label; identical images (same key) stay on one side."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    # group by key: each group goes whole to one side, stratified by the group's first label
    _, group = np.unique(ds.keys.astype(str), return_inverse=True)
    first = {}
    for i, g in enumerate(group):
        first.setdefault(int(g), i)
    val_groups = set()
    for cls in np.unique(ds.labels):
        gs = np.array([g for g, i in first.items() if ds.labels[i] == cls])
        rng.shuffle(gs)
        n_val = max(1, int(round(len(gs) * val_fraction))) if len(gs) > 1 else 0
        val_groups.update(gs[:n_val].tolist())
    is_val = np.array([int(g) in val_groups for g in group])
    return ds.subset(np.flatnonzero(~is_val)), ds.subset(np.flatnonzero(is_val))
