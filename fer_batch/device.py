"""Choosing the compute device once, and reporting the ONNX Runtime providers that really run.

``onnxruntime-gpu`` lists the CUDA and TensorRT providers even on machines without a GPU, so
``get_available_providers()`` is never taken to mean a GPU is there: a GPU counts as usable
only when the NVIDIA driver reports a device (``cuInit``/``cuDeviceGetCount`` through
``libcuda``, loaded with ctypes) and ONNX Runtime's CUDA provider library, with the CUDA and
cuDNN libraries it links against, can be loaded. torch is never imported for this: importing
it only to ask raised peak RSS of every process and Ray worker from 358 MB to 937 MB.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

from fer_batch.errors import ConfigError

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of CUDA devices the NVIDIA driver reports (0 without a GPU or a driver).

    Asks the driver API directly (``libcuda``, which the driver installs): no CUDA toolkit,
    no torch, and on a machine without the driver nothing is loaded at all.
    """
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0
    try:
        if lib.cuInit(0) != 0:
            return 0
        n = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(n)) != 0:
            return 0
        return int(n.value)
    except Exception:  # noqa: BLE001 - any failure to query means no usable GPU
        return 0


def ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@lru_cache(maxsize=1)
def ort_cuda_problem() -> str | None:
    """Why ONNX Runtime could not run on CUDA here, or None when its CUDA provider loads.

    Loads ``libonnxruntime_providers_cuda`` (and so the CUDA runtime, cuBLAS and cuDNN it links
    against, after ``onnxruntime.preload_dlls`` where available, which finds the NVIDIA pip
    wheels). Only called when the driver reports a GPU.
    """
    import ctypes
    from pathlib import Path

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("ONNX Runtime has no CUDAExecutionProvider (plain onnxruntime installed over onnxruntime-gpu?). "
                "Fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    capi = Path(ort.__file__).parent / "capi"
    shared = next(iter(sorted(capi.glob("libonnxruntime_providers_shared.*"))), None)
    cuda = next(iter(sorted(capi.glob("libonnxruntime_providers_cuda.*"))), None)
    if cuda is None:
        return f"ONNX Runtime's CUDA provider library is missing from {capi}"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload(directory="")  # "" : the NVIDIA pip packages (nvidia-*-cu12), if installed
        except Exception as e:  # noqa: BLE001 - preloading is a help, not a requirement
            log.debug("onnxruntime.preload_dlls: %s", e)
    try:
        if shared is not None:
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(cuda))
    except OSError as e:
        return f"ONNX Runtime's CUDA provider cannot load its libraries ({e}); install the CUDA/cuDNN versions it was built for"
    return None


def resolve_device(spec: str) -> str:
    """``auto`` -> ``cuda:0`` when a GPU is usable, else ``cpu``; ``cuda`` -> ``cuda:0``.

    Raises ConfigError when CUDA is asked for explicitly and is not usable.
    """
    spec = (spec or "auto").strip().lower()
    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", spec)
    if not m:
        raise ConfigError(f"--device: expected auto|cpu|cuda[:N], got {spec!r}")
    if spec == "cpu":
        return "cpu"
    n = cuda_device_count()
    if spec == "auto":
        if n == 0:
            return "cpu"
        problem = ort_cuda_problem()
        if problem:
            log.warning("a GPU is present but not usable, running on CPU: %s", problem)
            return "cpu"
        return "cuda:0"
    idx = int(m.group(1) or 0)
    if n == 0:
        raise ConfigError(f"--device {spec}: no usable CUDA GPU on this machine (run `fer-batch doctor`)")
    if idx >= n:
        raise ConfigError(f"--device {spec}: only {n} CUDA device(s) present")
    problem = ort_cuda_problem()
    if problem:
        raise ConfigError(f"--device {spec}: {problem}")
    return f"cuda:{idx}"


def ort_providers(device: str) -> list:
    """Explicit ONNX Runtime providers for a resolved device (``cpu`` or ``cuda:N``)."""
    if device.startswith("cuda"):
        idx = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def checked_provider(session, requested: str, device: str, what: str) -> str:
    """The provider ``session`` runs on; a CUDA request that fell back to CPU is caught here.

    onnxruntime falls back to CPU with only a logged error when CUDA cannot load: with
    ``--device auto`` that is a warning, with an explicit ``cuda[:N]`` a ModelError.
    """
    from fer_batch.errors import ModelError

    used = session_provider(session)
    if device.startswith("cuda") and used != "CUDAExecutionProvider":
        if (requested or "auto").strip().lower() == "auto":
            log.warning("onnxruntime could not start CUDA; the %s runs on %s", what, used)
        else:
            raise ModelError(f"device {requested!r}: onnxruntime could not start CUDA for the {what} (runs on {used})")
    return used


def session_provider(session) -> str:
    """The provider an ORT session actually runs on first (its preferred one)."""
    provs = session.get_providers()
    return provs[0] if provs else "unknown"


def ort_session_options(threads: int = 0):
    """ONNX Runtime session options shared by every model session of a run.

    Intra-op threads do not spin-wait between runs: the decode-ahead thread and the other
    stages share the same cores, and spinning threads took their CPU (measured on a 2-core
    box: 30 s of 720p went from 6.4 s with spinning to about 4 s without).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads > 0:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so
