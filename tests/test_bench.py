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
