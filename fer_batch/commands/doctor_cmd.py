"""``fer-batch doctor``: what this machine offers, and the exact fix for each problem."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass

import typer
from rich.console import Console
from rich.table import Table

from fer_batch.commands.console import text


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _ort_files_owner() -> str | None:
    """Which distribution's files the installed ``onnxruntime`` package really is (last install wins)."""
    import onnxruntime

    capi = getattr(onnxruntime, "__file__", "") or ""
    has_cuda_lib = False
    try:
        import pathlib

        has_cuda_lib = any(pathlib.Path(capi).parent.joinpath("capi").glob("libonnxruntime_providers_cuda*"))
    except OSError:
        pass
    return "onnxruntime-gpu" if has_cuda_lib else "onnxruntime"


def run_checks() -> list[Check]:
    checks: list[Check] = [Check("python", True, f"{platform.python_version()} on {platform.machine()}")]
    # GPU and driver
    gpu_detail, gpu_ok = "no NVIDIA GPU visible", False
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            )
            if out.returncode == 0 and out.stdout.strip():
                gpu_detail, gpu_ok = out.stdout.strip().replace("\n", "; "), True
        except (OSError, subprocess.TimeoutExpired):
            pass
    # No GPU is not a problem: everything runs on CPU.
    checks.append(Check("gpu", True, gpu_detail + ("" if gpu_ok else " (fer-batch runs on CPU)")))
    try:
        import torch

        cuda = torch.cuda.is_available()
        checks.append(Check("torch", True, f"{torch.__version__}; CUDA usable: {cuda} (training and export only)"))
    except Exception as e:  # noqa: BLE001
        checks.append(Check("torch", False, f"import failed: {e}", "pip install torch==2.14.1 torchvision==0.29.1"))
    # onnxruntime vs onnxruntime-gpu
    ort_v, ort_gpu_v = _version("onnxruntime"), _version("onnxruntime-gpu")
    try:
        import onnxruntime as ort

        provs = ort.get_available_providers()
        owner = _ort_files_owner()
        detail = f"installed: onnxruntime={ort_v} onnxruntime-gpu={ort_gpu_v}; package files from {owner}; providers listed: {', '.join(provs)}"
        clash = ort_v is not None and ort_gpu_v is not None
        fix = ""
        if clash:
            fix = (
                "both wheels install the same onnxruntime/ package (insightface depends on plain onnxruntime); "
                "for GPU use: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
            )
        if gpu_ok and "CUDAExecutionProvider" not in provs:
            fix = "GPU present but ONNX Runtime has no CUDA provider: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
        ok = not (gpu_ok and "CUDAExecutionProvider" not in provs)
        checks.append(Check("onnxruntime", ok, detail + ("; CLASH: both installed" if clash else ""), fix))
        if "CUDAExecutionProvider" in provs and not gpu_ok:
            checks.append(Check("onnxruntime providers", True,
                                "CUDA/TensorRT listed but no GPU: fer-batch uses CPUExecutionProvider (listing is not availability)"))
    except Exception as e:  # noqa: BLE001
        checks.append(Check("onnxruntime", False, f"import failed: {e}", "pip install onnxruntime-gpu"))
    # What --device auto decides, by the same test it uses (driver API + ORT's CUDA libraries; no torch)
    try:
        from fer_batch.device import cuda_device_count, ort_cuda_problem

        n_gpu = cuda_device_count()
        if n_gpu:
            problem = ort_cuda_problem()
            checks.append(Check("device auto", problem is None, f"{n_gpu} CUDA device(s) from the driver; "
                                + (problem or "ONNX Runtime's CUDA provider loads: --device auto runs on cuda:0"), problem or ""))
        else:
            checks.append(Check("device auto", True, "no CUDA device reported by the driver: --device auto runs on cpu"))
    except Exception as e:  # noqa: BLE001
        checks.append(Check("device auto", False, f"check failed: {e}"))
    for mod, dist, fix in (
        ("av", "av", "pip install av"),
        ("decord", "decord", "pip install decord==0.6.0 (x86-64 Linux/Windows wheels only)"),
        ("insightface", "insightface", "pip install insightface==2.1"),
        ("ray", "ray", 'pip install "ray[default]"'),
        ("pyarrow", "pyarrow", "pip install pyarrow"),
    ):
        try:
            __import__(mod)
            checks.append(Check(mod, True, _version(dist) or "?"))
        except Exception as e:  # noqa: BLE001
            checks.append(Check(mod, False, f"import failed: {e}", fix))
    try:
        from fer_batch.models import Registry

        reg = Registry.from_dir()
        bad = []
        for c in reg.cards():
            try:
                c.verify()
            except Exception as e:  # noqa: BLE001
                bad.append(str(e))
        checks.append(Check("model pack", not bad, f"{len(reg.names())} models: {', '.join(reg.names())}" + (f"; {'; '.join(bad)}" if bad else ""),
                            "fer-batch models build" if bad else ""))
    except Exception as e:  # noqa: BLE001
        checks.append(Check("model pack", False, str(e), "reinstall fer-batch, or pass --models-dir"))
    return checks


def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Print what this machine offers (GPU, ONNX Runtime providers, decord, Ray) and how to fix problems."""
    checks = run_checks()
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        t = Table(title="fer-batch doctor")
        for col in ("check", "ok", "detail", "fix"):
            t.add_column(col, overflow="fold")
        for c in checks:
            t.add_row(text(c.name), "[green]yes[/]" if c.ok else "[red]no[/]", text(c.detail), text(c.fix))
        Console().print(t)
    raise typer.Exit(0 if all(c.ok for c in checks) else 1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
