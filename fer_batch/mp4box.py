"""Editing MP4 boxes in pure Python, for generating test media (rotation, frame timing, faststart).

No FFmpeg needed: the boxes of an MP4 written by OpenCV (index after the data) are parsed,
changed and written back. Used by :mod:`fer_batch.synth`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from fer_batch.errors import FerBatchError

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"udta"}


def top_level_boxes(data: bytes) -> dict[str, tuple[int, int]]:
    """Top-level box type -> (start, end) byte range (first occurrence)."""
    out: dict[str, tuple[int, int]] = {}
    pos = 0
    while pos + 8 <= len(data):
        size, typ = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        if size < 8:
            break
        out.setdefault(typ.decode("latin1"), (pos, pos + size))
        pos += size
    return out


def _parse(data: bytes) -> list:
    """Boxes as ``[type, payload_bytes | children]`` (containers parsed recursively)."""
    boxes = []
    pos = 0
    while pos + 8 <= len(data):
        size, typ = struct.unpack(">I4s", data[pos : pos + 8])
        hdr = 8
        if size == 1:
            size, hdr = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
        elif size == 0:
            size = len(data) - pos
        payload = data[pos + hdr : pos + size]
        boxes.append([typ, _parse(payload) if typ in _CONTAINERS else bytearray(payload)])
        pos += size
    return boxes


def _serialize(boxes: list) -> bytes:
    out = bytearray()
    for typ, body in boxes:
        payload = _serialize(body) if isinstance(body, list) else bytes(body)
        out += struct.pack(">I4s", len(payload) + 8, typ) + payload
    return bytes(out)


def _find(boxes: list, *path: bytes) -> list:
    """All boxes at ``path`` (e.g. b"trak", b"tkhd") under ``boxes``."""
    found = [b for b in boxes if b[0] == path[0]]
    if len(path) == 1:
        return found
    return [x for b in found if isinstance(b[1], list) for x in _find(b[1], *path[1:])]


def _edit_moov(path: Path, edit) -> None:
    """Rewrite the ``moov`` box of an MP4 whose index follows its data (OpenCV's layout)."""
    data = path.read_bytes()
    top = top_level_boxes(data)
    if "moov" not in top or "mdat" not in top or top["moov"][0] < top["mdat"][0]:
        raise FerBatchError(f"{path}: expected an MP4 with its 'moov' box after 'mdat'")
    a, b = top["moov"]
    moov = _parse(data[a:b])
    edit(moov[0][1])
    path.write_bytes(data[:a] + _serialize(moov) + data[b:])


def _video_trak(moov: list) -> list:
    for trak in _find(moov, b"trak"):
        hdlr = _find(trak[1], b"mdia", b"hdlr")
        if hdlr and bytes(hdlr[0][1][8:12]) == b"vide":
            return trak[1]
    raise FerBatchError("no video track in MP4")


def set_rotation(src: str | Path, dst: str | Path, degrees: int) -> Path:
    """Copy an MP4 and set its display rotation (the track matrix) to 0/90/180/270 degrees
    clockwise, as phones do for portrait recordings."""
    one = 1 << 16
    mats = {
        0: (one, 0, 0, 0, one, 0, 0, 0, 1 << 30),
        90: (0, one, 0, -one, 0, 0, 0, 0, 1 << 30),
        180: (-one, 0, 0, 0, -one, 0, 0, 0, 1 << 30),
        270: (0, -one, 0, one, 0, 0, 0, 0, 1 << 30),
    }
    if degrees % 360 not in mats:
        raise FerBatchError(f"set_rotation: degrees must be 0, 90, 180 or 270, got {degrees}")
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())

    def edit(moov: list) -> None:
        tkhd = _find(_video_trak(moov), b"tkhd")[0][1]
        off = 4 + (32 if tkhd[0] == 1 else 20) + 16
        tkhd[off : off + 36] = struct.pack(">9i", *mats[degrees % 360])

    _edit_moov(dst, edit)
    return dst


def set_frame_durations(path: str | Path, durations_s: np.ndarray) -> np.ndarray:
    """Rewrite an MP4's time-to-sample table in place so frame ``i`` lasts ``durations_s[i]``.

    Returns the resulting presentation timestamps (seconds, exact in the track's timescale).
    """
    path = Path(path)
    durs = np.asarray(durations_s, dtype=np.float64)
    result: dict[str, np.ndarray] = {}

    def edit(moov: list) -> None:
        trak = _video_trak(moov)
        mdhd = _find(trak, b"mdia", b"mdhd")[0][1]
        if mdhd[0] != 0:
            raise FerBatchError("set_frame_durations: only version-0 mdhd is supported")
        timescale = struct.unpack(">I", mdhd[12:16])[0]
        ticks = np.maximum(1, np.rint(durs * timescale)).astype(np.int64)
        stsz = _find(trak, b"mdia", b"minf", b"stbl", b"stsz")[0][1]
        n_samples = struct.unpack(">I", stsz[8:12])[0]
        if n_samples != len(ticks):
            raise FerBatchError(f"set_frame_durations: file has {n_samples} frames, got {len(ticks)} durations")
        runs: list[list[int]] = []
        for t in ticks.tolist():
            if runs and runs[-1][1] == t:
                runs[-1][0] += 1
            else:
                runs.append([1, t])
        stts = _find(trak, b"mdia", b"minf", b"stbl", b"stts")[0]
        stts[1] = bytearray(b"\x00\x00\x00\x00" + struct.pack(">I", len(runs)) + b"".join(struct.pack(">II", c, d) for c, d in runs))
        total = int(ticks.sum())
        mdhd[16:20] = struct.pack(">I", total)
        mvhd = _find(moov, b"mvhd")[0][1]
        movie_scale = struct.unpack(">I", mvhd[12:16])[0]
        movie_total = int(round(total / timescale * movie_scale))
        mvhd[16:20] = struct.pack(">I", movie_total)
        tkhd = _find(trak, b"tkhd")[0][1]
        tkhd[20:24] = struct.pack(">I", movie_total)
        for elst in _find(trak, b"edts", b"elst"):
            if struct.unpack(">I", elst[1][4:8])[0] >= 1:
                elst[1][8:12] = struct.pack(">I", movie_total)
        result["ts"] = np.concatenate([[0], np.cumsum(ticks)[:-1]]) / timescale

    _edit_moov(path, edit)
    return result["ts"]


def sample_byte_ranges(path: str | Path) -> np.ndarray:
    """(frames, 2) byte offset and size of each video sample of an MP4, in decode order.

    Tells which frames a damaged byte range hits (OpenCV's MPEG-4 output has no B-frames, so
    decode order is presentation order).
    """
    data = Path(path).read_bytes()
    a, b = top_level_boxes(data)["moov"]
    trak = _video_trak(_parse(data[a:b])[0][1])
    stbl = _find(trak, b"mdia", b"minf", b"stbl")[0][1]
    stsz = _find(stbl, b"stsz")[0][1]
    fixed, count = struct.unpack(">II", stsz[4:12])
    sizes = [fixed] * count if fixed else list(struct.unpack(f">{count}I", stsz[12 : 12 + 4 * count]))
    if _find(stbl, b"stco"):
        co = _find(stbl, b"stco")[0][1]
        n = struct.unpack(">I", co[4:8])[0]
        offsets = list(struct.unpack(f">{n}I", co[8 : 8 + 4 * n]))
    else:
        co = _find(stbl, b"co64")[0][1]
        n = struct.unpack(">I", co[4:8])[0]
        offsets = list(struct.unpack(f">{n}Q", co[8 : 8 + 8 * n]))
    sc = _find(stbl, b"stsc")[0][1]
    m = struct.unpack(">I", sc[4:8])[0]
    runs = [struct.unpack(">III", sc[8 + 12 * k : 20 + 12 * k]) for k in range(m)]
    out = []
    s = 0
    for ci, off in enumerate(offsets, start=1):
        per = next(r[1] for r in reversed(runs) if r[0] <= ci)
        for _ in range(per):
            if s >= count:
                break
            out.append((off, sizes[s]))
            off += sizes[s]
            s += 1
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def faststart_bytes(data: bytes) -> bytes:
    """The same MP4 with its ``moov`` box moved before the data (chunk offsets shifted)."""
    top = top_level_boxes(data)
    if "moov" not in top or "ftyp" not in top:
        raise FerBatchError("faststart: not an MP4 with ftyp and moov")
    a, b = top["moov"]
    fa, fb = top["ftyp"]
    moov = _parse(data[a:b])
    shift = b - a
    for trak in _find(moov[0][1], b"trak"):
        for typ, fmt in ((b"stco", ">I"), (b"co64", ">Q")):
            for box in _find(trak[1], b"mdia", b"minf", b"stbl", typ):
                body = box[1]
                count = struct.unpack(">I", body[4:8])[0]
                step = struct.calcsize(fmt)
                for k in range(count):
                    o = 8 + k * step
                    (v,) = struct.unpack(fmt, body[o : o + step])
                    body[o : o + step] = struct.pack(fmt, v + shift)
    new_moov = _serialize(moov)
    if len(new_moov) != shift:
        raise FerBatchError("faststart: moov size changed")
    return data[fa:fb] + new_moov + data[fb:a] + data[b:]


__all__ = ["set_rotation", "set_frame_durations", "sample_byte_ranges", "faststart_bytes", "top_level_boxes"]
