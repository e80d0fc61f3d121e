"""Make a longer benchmark video by repeating one without re-encoding (stream copy).

    .venv/bin/python examples/decode_bench/make_long.py SRC.mp4 OUT.mp4 --times 5

The packets of the first video stream are written ``--times`` times with their timestamps
shifted, so the result has the same codec, GOP structure and bitrate as the source (a 60 s
file repeated 30 times gives a 30-minute video for the memory check). Write it outside the
repository (``/tmp`` or an ignored folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import av


def repeat_video(src: Path, dst: Path, times: int) -> Path:
    with av.open(str(src)) as probe:
        vs = probe.streams.video[0]
        first = last_end = None
        for pk in probe.demux(vs):
            if pk.dts is None:
                continue
            p = pk.pts if pk.pts is not None else pk.dts
            first = p if first is None else min(first, p)
            end = (pk.pts if pk.pts is not None else pk.dts) + (pk.duration or 0)
            last_end = end if last_end is None else max(last_end, end)
        span = last_end - first  # presentation span: the next copy starts where this one ends
    with av.open(str(dst), "w") as out:
        with av.open(str(src)) as inp0:
            ost = out.add_stream_from_template(inp0.streams.video[0])
        for k in range(times):
            with av.open(str(src)) as inp:
                ist = inp.streams.video[0]
                for pk in inp.demux(ist):
                    if pk.dts is None:
                        continue
                    pk.pts = None if pk.pts is None else pk.pts + k * span
                    pk.dts = pk.dts + k * span
                    pk.stream = ost
                    out.mux(pk)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--times", type=int, default=5)
    a = ap.parse_args()
    repeat_video(a.src, a.dst, a.times)
    print(a.dst)


if __name__ == "__main__":
    main()
