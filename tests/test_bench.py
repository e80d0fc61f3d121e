"""``fer-batch bench`` building blocks on the generated sample video (no timing asserted)."""

from __future__ import annotations

from fer_batch.bench import _video_info, decode_only, stage_rates


def test_video_info_and_decode_only_rates(sample_video):
    n, dur = _video_info(sample_video.path)
    assert n == 100 and abs(dur - 4.0) < 0.05
    for backend in ("decord", "pyav"):
        fps, rss = decode_only(sample_video.path, backend, threads=1)
        assert fps > 0 and rss > 0


def test_stage_rates_reports_detector_and_classifier_separately(sample_video):
    r = stage_rates(sample_video.path, device="cpu", fps=2.0, max_frames=4)
    assert r["frames"] == 4 and r["faces"] == 24  # 6 faces in each frame
    assert r["detector_frames_per_s"] > 0 and r["classifier_faces_per_s"] > 0
    assert r["detector_provider"] == r["classifier_provider"] == "CPUExecutionProvider"
    assert r["detector_batch"] == 1  # one frame per detector run on CPU (GPU: detect.GPU_BATCH)


def test_run_child_reports_the_largest_process_and_all_processes_together():
    """The local runner's worker is a child of ``fer-batch process``: the bench reports both the
    largest process (wait4) and the sum over the run's processes (sampled from /proc). Measured
    from a small fresh process, as ``fer-batch bench`` is one: Linux keeps a process's peak RSS
    across fork and exec, so a child of this (large) test process would start at its size."""
    import json
    import subprocess
    import sys

    code = (
        "import subprocess, sys, time; a = bytearray(150 << 20); "
        "subprocess.run([sys.executable, '-c', 'import time; b = bytearray(200 << 20); time.sleep(1.5)']); "
        "print('done')"
    )
    probe = (
        "import json, sys; from fer_batch.bench import _run_child; t = []; "
        "w, big, out = _run_child([sys.executable, '-c', sys.argv[1]], totals=t); "
        "print(json.dumps([w, big, out, t]))"
    )
    r = subprocess.run([sys.executable, "-c", probe, code], capture_output=True, text=True, check=True)
    wall, largest, out, totals = json.loads(r.stdout.strip().splitlines()[-1])
    assert out.strip() == "done" and wall > 1.0
    assert 200 < largest < 330, largest  # the grandchild alone
    assert totals and totals[0] > 340, totals  # both at once
