"""Ray runner benchmark: scaling over nodes, start-up overhead, peak memory.

Three measurements, all with the real pipeline (decode, detect, track, classify, Parquet):

1. Scaling on CPU-bound work: the same inputs on a Ray cluster of 1 node x 1 CPU (one worker)
   and of 2 nodes x 1 CPU (two workers), both made with ``ray.cluster_utils.Cluster`` on this
   machine, each node either confined to one core (``--pin pinned``: the node's raylet and
   workers inherit a one-core CPU affinity, like a 1-CPU VM or pod) or free to use every core
   (``--pin unpinned``: Ray's ``num_cpus`` is only a scheduling label). Throughput = sampled frames per wall second of ``fer_batch.api.run``; the
   steady-state figure excludes the workers' start-up (from the first worker ready to the
   last unit done).
2. Start-up overhead on a small job: ``fer-batch process`` with ``--runner local`` and with
   ``--runner ray`` (embedded Ray), each a separate process, end-to-end wall time.
3. Peak memory (RSS high-water mark): the driver process (``os.wait4``) and each worker
   actor (``VmHWM`` from /proc, read when it reports a unit).

Usage::

    python examples/ray_bench/bench.py --out examples/ray_bench/results.json
    python examples/ray_bench/bench.py --videos my.mp4 --segment-seconds 10 --fps 2

With no ``--videos``, ``/work/shared/data/bench/t1_720p30_60s.mp4`` is used when present,
else a 30 s 960x540 video is generated from insightface's t1.jpg.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_VIDEO = Path("/work/shared/data/bench/t1_720p30_60s.mp4")


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, MB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def descendants(root: int) -> set[int]:
    """Every live descendant process of ``root``."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def descendants_rss_mb(root: int) -> float:
    """Current RSS summed over every descendant process of ``root`` (Ray's own processes), MB."""
    total = 0.0
    for pid in descendants(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024.0
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def cpus_allowed(pid: int) -> str:
    """The CPU affinity of a live process as /proc prints it (e.g. ``0`` or ``0-1``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


@contextlib.contextmanager
def pinned(cores: set[int] | None):
    """Processes started inside inherit this CPU affinity (None: leave it alone).

    Ray's ``num_cpus`` is a scheduling label: it does not confine a node's processes. A
    raylet started while the driver is pinned to one core inherits that affinity and passes it
    on to every worker it forks, which makes the node a real one-core node.
    """
    if cores is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def default_videos(tmp: Path) -> list[Path]:
    if SHARED_VIDEO.exists():
        return [SHARED_VIDEO]
    from fer_batch import synth

    p = tmp / "t1_540p25_30s.mp4"
    synth.make_sample_video(p, seconds=30, fps=25, size=(960, 540))
    return [p]


def scaling_run(videos: list[Path], n_nodes: int, args, tmp: Path, pin: bool) -> dict:
    """One run on a fresh cluster of ``n_nodes`` x 1 CPU with one worker per node.

    ``pin``: node i's processes (raylet, its workers) are confined to core i, so "1 CPU" is
    one physical core; without it each node's processes may use every core of the machine.
    The driver itself is never pinned.
    """
    import ray
    from ray.cluster_utils import Cluster

    from fer_batch.api import run

    rtmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Ray's socket paths are limited
    os.makedirs(os.path.join(rtmp, "ray"))
    os.environ["RAY_TMPDIR"] = rtmp  # Cluster writes its address file there, not in /tmp/ray
    ncpu = len(os.sched_getaffinity(0))
    with pinned({0} if pin else None):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": rtmp, "include_dashboard": False})
    for i in range(1, n_nodes):
        with pinned({i % ncpu} if pin else None):
            cluster.add_node(num_cpus=1, temp_dir=rtmp)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    ev: dict = {"ready": [], "units": [], "hwm": {}, "cpu0": {}, "cpu": {}, "all_cpu": 0.0, "affinity": {}}
    me = os.getpid()
    cpu_before = {p: cpu_seconds(p) for p in descendants(me)}

    def hook(step: str, payload: dict) -> None:
        now = time.perf_counter()
        pid = payload.get("pid")
        if step == "worker_ready":
            ev["ready"].append(now)
            ev["hwm"][pid] = vm_hwm_mb(pid)
            ev["cpu0"][pid] = cpu_seconds(pid)  # after loading the models
            ev["affinity"][pid] = cpus_allowed(pid)
        elif step == "unit_done":
            ev["units"].append((now, payload["node_id"], pid))
            ev["hwm"][pid] = max(ev["hwm"].get(pid, 0.0), vm_hwm_mb(pid))
            ev["cpu"][pid] = cpu_seconds(pid)
            # every process of both nodes (workers and Ray's own), CPU used since the run began
            ev["all_cpu"] = sum(cpu_seconds(p) - cpu_before.get(p, 0.0) for p in descendants(me))

    try:
        t0 = time.perf_counter()
        res = run(
            [str(v) for v in videos], out=str(tmp / f"scale{n_nodes}" / "report.parquet"), runner="ray",
            num_workers=n_nodes, cpus_per_worker=1.0, threads=1, device="cpu", fps=args.fps,
            segment_seconds=args.segment_seconds, hook=hook,
        )  # fmt: skip
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
    frames = sum(r["frames_sampled"] for r in res.sources.to_pylist())
    faces = sum(r["faces"] for r in res.sources.to_pylist())
    steady = max(u[0] for u in ev["units"]) - min(ev["ready"])
    worker_cpu = sum(ev["cpu"][p] - ev["cpu0"].get(p, 0.0) for p in ev["cpu"])
    return {
        "nodes": n_nodes, "workers": n_nodes, "pinned": pin, "worker_cpus_allowed": sorted(ev["affinity"].values()),
        "units": len(ev["units"]),
        "nodes_used": len({u[1] for u in ev["units"]}), "frames": frames, "faces": faces,
        "wall_s": round(wall, 2), "fps_wall": round(frames / wall, 3),
        "steady_s": round(steady, 2), "fps_steady": round(frames / steady, 3),
        "worker_cpu_s": round(worker_cpu, 1), "frames_per_worker_cpu_s": round(frames / worker_cpu, 3),
        "cluster_cpu_s": round(ev["all_cpu"], 1),
        "worker_peak_rss_mb": round(max(ev["hwm"].values()), 1),
    }  # fmt: skip


def child_overhead(video: Path, runner: str, out: Path) -> None:
    """Child mode: one small run in this process; print wall and worker peak RSS as JSON."""
    from fer_batch.api import run

    hwm: dict[int, float] = {}
    ray_rss = [0.0]

    def hook(step: str, payload: dict) -> None:
        if step in ("worker_ready", "unit_done"):
            hwm[payload["pid"]] = max(hwm.get(payload["pid"], 0.0), vm_hwm_mb(payload["pid"]))
            ray_rss[0] = max(ray_rss[0], descendants_rss_mb(os.getpid()))

    t0 = time.perf_counter()
    res = run([str(video)], out=str(out), runner=runner, device="cpu", threads=1, num_workers=1, hook=hook)
    wall = time.perf_counter() - t0
    print(json.dumps({"runner": runner, "run_wall_s": round(wall, 2), "frames": int(sum(res.sources.column("frames_sampled").to_pylist())),
                      "worker_peak_rss_mb": round(max(hwm.values()), 1) if hwm else None,
                      "ray_processes_rss_mb": round(ray_rss[0], 1) if hwm else None}))  # fmt: skip


def overhead(video: Path, tmp: Path) -> list[dict]:
    """Small job, local vs embedded Ray, each in a fresh process (import, start, run, stop)."""
    out = []
    for runner in ("local", "ray"):
        cmd = [sys.executable, __file__, "--child", runner, "--child-video", str(video),
               "--child-out", str(tmp / f"small_{runner}" / "report.parquet")]  # fmt: skip
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout = p.stdout.read()
        stderr = p.stderr.read()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{runner} child failed: {stderr[-3000:]}")
        rec = json.loads(stdout.strip().splitlines()[-1])
        rec.update(process_wall_s=round(wall, 2), driver_peak_rss_mb=round(ru.ru_maxrss / 1024.0, 1))
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", nargs="*", type=Path)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--segment-seconds", type=float, default=7.5)
    ap.add_argument("--small-seconds", type=float, default=4.0, help="length of the small job's video")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--pin", choices=("pinned", "unpinned", "both"), default="both",
                    help="confine node i to core i (a real 1-core node), leave nodes free, or measure both")
    ap.add_argument("--child", choices=("local", "ray"), help=argparse.SUPPRESS)
    ap.add_argument("--child-video", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_overhead(args.child_video, args.child, args.child_out)
        return
    import logging

    logging.basicConfig(level=logging.WARNING)
    from fer_batch import synth

    tmp = Path(tempfile.mkdtemp(prefix="fer-ray-bench-"))
    videos = args.videos or default_videos(tmp)
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
        "videos": [str(v) for v in videos], "fps": args.fps, "segment_seconds": args.segment_seconds,
    }  # fmt: skip
    if not args.skip_scaling:
        modes = {"pinned": True, "unpinned": False} if args.pin == "both" else {args.pin: args.pin == "pinned"}
        for name, pin in modes.items():
            one = scaling_run(videos, 1, args, tmp, pin)
            two = scaling_run(videos, 2, args, tmp, pin)
            results[f"scaling_{name}"] = {"one_node": one, "two_nodes": two,
                                          "ratio_wall": round(two["fps_wall"] / one["fps_wall"], 3),
                                          "ratio_steady": round(two["fps_steady"] / one["fps_steady"], 3)}  # fmt: skip
            print(name, json.dumps(results[f"scaling_{name}"], indent=1), flush=True)
    small = tmp / "small.mp4"
    synth.make_sample_video(small, seconds=args.small_seconds, fps=25, size=(640, 360))
    results["overhead"] = overhead(small, tmp)
    loc, ray_ = results["overhead"]
    results["overhead_s"] = {"process": round(ray_["process_wall_s"] - loc["process_wall_s"], 2),
                             "run": round(ray_["run_wall_s"] - loc["run_wall_s"], 2)}  # fmt: skip
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(results["overhead"], indent=1), json.dumps(results["overhead_s"]), flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
