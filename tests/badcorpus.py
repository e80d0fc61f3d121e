"""A generated corpus of bad and awkward inputs, as an unattended run meets them (issue 11).

``build_corpus(root)`` writes one folder, ``root / "in"``, holding good media under awkward
names and every kind of broken input, plus a folder outside it that links point to, and
returns the :class:`Case` list saying what ``fer-batch process`` must record for each.
Everything is made at test time from ``fer_batch.synth`` (insightface's group photo), PyAV and
the standard library; nothing is downloaded. Reusable: any test can build it and check its
own expectations against ``Case.expect``.

Kinds (``Case.kind``): good video, variable frame rate, rotation metadata, unicode name,
markup-like name (``clip[/x].mp4``), HTML/quote name, escape-sequence name, good images
(16-bit, CMYK, EXIF-rotated, alpha), zero-byte video and image, random bytes as video and
image, video truncated before its index, video truncated after a front index, video corrupt
in the middle, audio-only MP4, decompression bombs (10 Gpx and 120 Mpx headers), EPS named
``.jpg``, text named ``.jpg``, a non-media file, a dangling link, a link to itself, a folder
symlink loop, a web of links between sibling folders, links (folder and file) leading
outside the inputs, a FIFO, a Unix socket, a name that is not valid UTF-8, a hidden file, a
folder named like a video, an 8K video.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from fer_batch import synth
from fer_batch.mp4box import set_rotation

ESC = "\x1b"

# Every Case.kind, in the order build_corpus writes them (tests parametrize over these).
KINDS: tuple[str, ...] = (
    "good video", "variable frame rate", "rotation metadata", "unicode name", "markup-like name",
    "16-bit image", "CMYK image", "EXIF-rotated image", "alpha image", "HTML and quotes in the name",
    "escape sequence in the name", "folder named like a video",
    "zero-byte video", "zero-byte image", "random bytes as video", "random bytes as image",
    "truncated before its index", "truncated after a front index", "corrupt in the middle", "audio-only mp4",
    "decompression bomb 10 Gpx", "decompression bomb 120 Mpx", "EPS named .jpg", "text named .jpg",
    "non-media file", "hidden file", "name not valid UTF-8",
    "dangling link", "link to itself", "folder symlink loop", "sibling-folder link web",
    "link to a folder outside the inputs", "link to a file outside the inputs", "FIFO", "Unix socket",
    "8K video",
)  # fmt: skip

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 64 48
%%EndComments
newpath 0 0 moveto 64 48 lineto stroke
showpage
%%EOF
"""


@dataclass
class Case:
    """One input of the corpus and what a run must record for it.

    Attributes:
        kind: what it is (short, unique).
        path: the input path as fer-batch lists it (``None``: several or none, see ``paths``).
        expect: the allowed statuses (``ok``, ``partial``, ``failed``, ``skipped``), or
            ``("absent",)`` for an entry that must not be listed at all (hidden files).
        rows: ``True``: rows are required; ``False``: none allowed; ``None``: not checked.
        paths: for kinds that stand for several files (a link web): all of them.
        leave_out: the issue item this case's check depends on when that item is not done in
            this tree (the test xfails those checks, naming the item).
    """

    kind: str
    path: Path | None
    expect: tuple[str, ...]
    rows: bool | None = None
    paths: list[Path] = field(default_factory=list)
    leave_out: str | None = None

    @property
    def shown(self) -> str:
        """The path as the sources table stores it (names not valid UTF-8 get ``\\xNN``)."""
        s = str(self.path)
        try:
            s.encode("utf-8")
            return s
        except UnicodeEncodeError:
            return os.fsencode(s).decode("utf-8", "backslashreplace")


@dataclass
class Corpus:
    root: Path  # the folder to give to fer-batch process
    outside: Path  # a folder outside it that links point to
    cases: list[Case]
    corrupt_video: Path
    corrupt_range: tuple[int, int]  # damaged bytes of corrupt_video
    keep_alive: list = field(default_factory=list)  # objects to keep (the bound socket)

    def close(self) -> None:
        for obj in self.keep_alive:
            obj.close()

    def case(self, kind: str) -> Case:
        return next(c for c in self.cases if c.kind == kind)


def write_audio_only_mp4(path: Path, seconds: float = 1.0) -> Path:
    """An MP4 holding only an AAC audio track (a voice memo): no video stream at all."""
    import av

    rate = 16000
    with av.open(str(path), "w") as out:
        st = out.add_stream("aac", rate=rate)
        st.layout = "mono"
        t = np.arange(int(rate * seconds)) / rate
        pcm = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for k in range(0, len(pcm), 1024):
            chunk = pcm[k : k + 1024]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = k
            frame.time_base = Fraction(1, rate)
            for pkt in st.encode(frame):
                out.mux(pkt)
        for pkt in st.encode(None):
            out.mux(pkt)
    return path


def build_corpus(
    root: str | Path, video_size: tuple[int, int] = (640, 360), seconds: float = 4.0, with_8k: bool = False
) -> Corpus:
    """Write the corpus under ``root`` and return its cases (see the module docstring).
    ``with_8k``: add a 7680x4320 video (2 frames; minutes to write on a busy 2-core box)."""
    root = Path(root)
    d = root / "in"
    outside = root / "outside"
    for p in (d, outside):
        p.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(kind: str, path: Path | None, expect: tuple[str, ...], rows: bool | None = None, **kw) -> None:
        cases.append(Case(kind, path, expect, rows, **kw))

    # ------------------------------------------------------------------ good media, awkward names
    good = synth.make_sample_video(d / "good.mp4", seconds=seconds, fps=25, size=video_size)
    add("good video", good.path, ("ok",), True)
    n_vfr = 40
    durs = np.where(np.arange(n_vfr) % 2 == 0, 0.02, 0.18)  # 50 fps and 5.6 fps alternating
    vfr = synth.make_vfr_video(d / "vfr.mp4", durs, size=(video_size[0] // 2, video_size[1] // 2))
    add("variable frame rate", vfr.path, ("ok",), True)
    add("rotation metadata", set_rotation(good.path, d / "rotated90.mp4", 90), ("ok",), True)
    uni = d / "vidéo 日本語 😀.mp4"
    shutil.copy(good.path, uni)
    add("unicode name", uni, ("ok",), True)
    (d / "clip[").mkdir()
    markup = d / "clip[" / "x].mp4"
    shutil.copy(good.path, markup)
    add("markup-like name", markup, ("ok",), True)
    imgs = synth.make_image_folder(root / "images_src", scale=0.5)
    by_note = {i.path.name: i for i in imgs}
    for kind, name in (
        ("16-bit image", "08_gray16.png"), ("CMYK image", "09_cmyk.jpg"),
        ("EXIF-rotated image", "07_exif_rot6.jpg"), ("alpha image", "06_alpha.png"),
    ):  # fmt: skip
        dst = d / "photos" / name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(by_note[name].path, dst)
        add(kind, dst, ("ok",), True)
    html_name = d / "photos" / "it's \"quoted\" & <img src=x onerror=alert(1)>.jpg"
    shutil.copy(by_note["01_t1.jpg"].path, html_name)
    add("HTML and quotes in the name", html_name, ("ok",), True)
    esc_name = d / "photos" / f"a{ESC}[31mred{ESC}]0;title\x07.jpg"
    shutil.copy(imgs[1].path, esc_name)
    add("escape sequence in the name", esc_name, ("ok",), True)
    vid_folder = d / "folder.mp4"  # a folder named like a video: walked as a folder
    vid_folder.mkdir()
    shutil.copy(imgs[2].path, vid_folder / "inside.bmp")
    add("folder named like a video", vid_folder / "inside.bmp", ("ok",), True)

    # ------------------------------------------------------------------ broken files
    bad = d / "bad"
    add("zero-byte video", synth.write_empty(bad / "empty.mp4"), ("failed",), False)
    add("zero-byte image", synth.write_empty(bad / "empty.jpg"), ("failed",), False)
    add("random bytes as video", synth.write_random_bytes(bad / "random.mp4", 50_000), ("failed",), False)
    add("random bytes as image", synth.write_random_bytes(bad / "random.png", 20_000, seed=1), ("failed",), False)
    add("truncated before its index", synth.make_truncated_video(good.path, bad / "truncated.mp4", keep=0.4), ("failed",), False)
    add(
        "truncated after a front index",
        synth.make_truncated_video(good.path, bad / "truncated_faststart.mp4", keep=0.4, faststart=True),
        ("failed", "partial"), None,
    )  # fmt: skip
    corrupt, rng = synth.make_corrupt_video(good.path, bad / "corrupt_middle.mp4", start=0.45, length=0.25)
    add("corrupt in the middle", corrupt, ("partial",), True)
    add("audio-only mp4", write_audio_only_mp4(bad / "voice_memo.mp4"), ("failed",), False)
    add("decompression bomb 10 Gpx", synth.write_bomb_png(bad / "bomb.png", 100_000, 100_000), ("failed",), False)
    add("decompression bomb 120 Mpx", synth.write_bomb_png(bad / "bomb_120mp.png", 12_000, 10_000), ("failed",), False)
    eps = bad / "vector.jpg"
    eps.write_bytes(EPS)
    add("EPS named .jpg", eps, ("failed",), False)
    add("text named .jpg", synth.write_not_an_image(bad / "not_an_image.jpg"), ("failed",), False)
    add("non-media file", synth.write_text_file(bad / "notes.txt"), ("skipped",), False)
    hidden = bad / ".hidden.mp4"
    shutil.copy(good.path, hidden)
    add("hidden file", hidden, ("absent",), False)
    latin1 = bad / os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(imgs[0].path, latin1)
    add("name not valid UTF-8", latin1, ("failed",), False)

    # ------------------------------------------------------------------ links and special files
    links = d / "links"
    links.mkdir()
    os.symlink(links / "gone.mp4", links / "dangling.mp4")
    add("dangling link", links / "dangling.mp4", ("failed",), False)
    os.symlink(links / "self.mp4", links / "self.mp4")
    add("link to itself", links / "self.mp4", ("failed",), False)
    (links / "loop").mkdir()
    os.symlink(links, links / "loop" / "back")
    add("folder symlink loop", links / "loop" / "back", ("skipped",), False)
    web = d / "web"
    names = ["a", "b", "c"]
    for n in names:
        (web / n).mkdir(parents=True)
        synth.write_text_file(web / n / f"{n}.txt")
    for n in names:
        for m in names:
            if m != n:
                os.symlink(web / m, web / n / f"to_{m}")
    add("sibling-folder link web", None, ("skipped",), False, paths=[web / n / f"{n}.txt" for n in names])
    shutil.copy(imgs[0].path, outside / "outside.jpg")
    os.symlink(outside, links / "to_outside_dir")
    add("link to a folder outside the inputs", links / "to_outside_dir", ("skipped",), False)
    os.symlink(outside / "outside.jpg", links / "to_outside.jpg")
    add("link to a file outside the inputs", links / "to_outside.jpg", ("skipped",), False)
    special = d / "special"
    special.mkdir()
    os.mkfifo(special / "pipe.mp4")
    add("FIFO", special / "pipe.mp4", ("skipped",), False)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(special / "socket.mp4"))
    add("Unix socket", special / "socket.mp4", ("skipped",), False)
    if with_8k:  # 7680x4320: decoded at full size it is 100 MB a frame (issue 11 item 6)
        big = synth.make_sample_video(d / "big_8k.mp4", seconds=1.0, fps=2, size=(7680, 4320), moving=False)
        add("8K video", big.path, ("ok",), True)
    if tuple(c.kind for c in cases) != KINDS[: len(cases)]:  # pragma: no cover - keep KINDS in step
        raise RuntimeError(f"badcorpus.KINDS is out of date: {[c.kind for c in cases]}")
    return Corpus(root=d, outside=outside, cases=cases, corrupt_video=corrupt, corrupt_range=rng, keep_alive=[sock])
