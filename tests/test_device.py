"""Device choice: CPU everywhere; CUDA paths run only where a GPU is really usable (skip otherwise)."""

from __future__ import annotations

import numpy as np
import pytest

from fer_batch.api import run
from fer_batch.device import cuda_device_count, ort_cuda_problem, ort_providers, resolve_device
from fer_batch.errors import ConfigError

HAS_GPU = cuda_device_count() > 0 and ort_cuda_problem() is None
gpu = pytest.mark.skipif(not HAS_GPU, reason="no usable CUDA GPU (driver + onnxruntime-gpu) on this machine")


def test_cpu_and_auto():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if HAS_GPU else "cpu")
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    assert ort_providers("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})


_NO_TORCH = r"""
import sys
from fer_batch.api import run
res = run([sys.argv[1]], max_frames=2)  # --device auto, the default
assert res.models["detector"]["provider"], res.models
print("torch imported" if "torch" in sys.modules else "no torch")
"""


def test_device_auto_does_not_import_torch(sample_video):
    """Detecting the GPU must not cost a torch import (about 0.6 GB in every process)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(sample_video.path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "no torch"


def test_bad_device_spec():
    with pytest.raises(ConfigError, match="auto\\|cpu\\|cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_explicit_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="no usable CUDA GPU"):
        resolve_device("cuda")


def test_cpu_run_reports_cpu_provider(sample_video):
    res = run([sample_video.path], device="cpu", max_frames=1)
    assert res.models["detector"]["provider"] == "CPUExecutionProvider"
    assert res.models["classifier"]["provider"] == "CPUExecutionProvider"


@pytest.mark.gpu
@gpu
def test_cuda_run_matches_cpu(sample_video):
    cpu = run([sample_video.path], device="cpu", max_frames=3)
    cuda = run([sample_video.path], device="cuda", max_frames=3)
    assert cuda.models["detector"]["provider"] == "CUDAExecutionProvider"
    assert cuda.models["classifier"]["provider"] == "CUDAExecutionProvider"
    a = cpu.faces.sort_by([("frame_index", "ascending"), ("x1", "ascending")])
    b = cuda.faces.sort_by([("frame_index", "ascending"), ("x1", "ascending")])
    assert a.num_rows == b.num_rows
    np.testing.assert_allclose(a.column("x1").to_numpy(), b.column("x1").to_numpy(), atol=1.0)
    np.testing.assert_allclose(a.column("p_happy").to_numpy(), b.column("p_happy").to_numpy(), atol=2e-3)
