"""The Ray runner: the plan's units in worker actors, on one machine or a cluster.

This is the only module of fer-batch that imports ``ray``; it holds only what needs Ray:
the session (embedded or joined), the worker actors, scheduling and retries. What the units
are, how a split source is merged and where rows are written are the plan's, the driver's
and the sink's business (``fer_batch.plan``, ``fer_batch.driver``, ``fer_batch.sink``).

* Worker actors (``num_workers``, ``cpus_per_worker``, fractional ``gpus_per_worker``) load
  the models once in their constructor and run one unit at a time through the same
  ``process_source`` as the local runner. A unit's rows come back to the driver through
  Ray's object store (one segment's rows: small), so only the driver writes, and it writes
  each row once; workers need no access to the output location.
* Units are handed out in plan order as workers become free; results are yielded as they
  complete. A bad input fails alone (its row says why). A worker process that dies is
  restarted by Ray and its unit retried (``max_restarts`` / ``max_task_retries``); a unit
  that keeps killing workers is yielded as failed.

Embedded mode (no address): a private Ray instance on 127.0.0.1 only, with token
authentication, no dashboard unless asked, its own temp folder, shut down at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import ray
import ray._private.ray_constants as ray_constants
from ray.exceptions import RayActorError, RayError, RayTaskError

from fer_batch.config import RunConfig
from fer_batch.device import resolve_device
from fer_batch.errors import ConfigError, FerBatchError
from fer_batch.pipeline import Hook, Stages, process_source
from fer_batch.plan import UnitResult, WorkUnit, own_frame_count, unit_media_seconds
from fer_batch.runners.support import UnitClocks, no_hook, patched_env, short_error, timed_out

log = logging.getLogger(__name__)

# Ray fault tolerance: a killed worker process is restarted this many times, and a unit that
# was running on it is retried this many times, before the unit is given up.
WORKER_MAX_RESTARTS = 3
TASK_MAX_RETRIES = 3
# A unit whose worker died (after Ray's own retries) is resubmitted to another worker this
# many times in total before it is recorded as failed (a file that crashes the decoder).
UNIT_MAX_ATTEMPTS = 2
# Object store of the embedded instance: only unit results (face rows) travel through it.
EMBEDDED_OBJECT_STORE_BYTES = 256 * 1024 * 1024
# How long to wait for the first worker to start before giving up (cluster may be scaling).
READY_TIMEOUT_S = 900.0
# How long a busy worker may take to say its unit's time limit (--source-timeout auto).
LIMIT_QUERY_TIMEOUT_S = 10.0


class FerWorker:
    """A Ray actor: loads the models once, then runs units.

    It runs with two threads (``max_concurrency=2``) so that ``limit`` answers while ``run``
    is busy; the driver never runs two units on one worker at once.
    """

    def __init__(self, cfg: RunConfig, gpus: float):
        threads = cfg.threads or max(1, int(round(cfg.ray.cpus_per_worker or 1)))
        self.cfg = replace(cfg, threads=threads)
        self.device = resolve_device(cfg.classify.device) if gpus > 0 else "cpu"
        self.stages = Stages(self.cfg, self.device).setup()
        self.stages.use_reid  # noqa: B018 - raises here when --reid on cannot work
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.pid = os.getpid()
        self._limit: tuple[str, float | None] | None = None

    def ready(self) -> dict:
        return {"node_id": self.node_id, "node_ip": self.node_ip, "pid": self.pid, "device": self.device,
                "models": self.stages.models_info()}  # fmt: skip

    def limit(self, key: str) -> float | None:
        """The time limit of unit ``key`` once its media is open (None: not known yet)."""
        cur = self._limit
        return cur[1] if cur is not None and cur[0] == key else None

    def run(self, unit: WorkUnit) -> dict:
        cfg = self.cfg

        def hook(step: str, payload: dict) -> None:
            if step == "source_open":
                frames = getattr(payload.get("reader"), "planned_frames", 0)
                self._limit = (unit.key, cfg.source_time_limit(unit_media_seconds(unit, cfg, payload.get("duration_s")), frames))

        self._limit = None
        res = process_source(unit.source, self.stages, cfg, hook=hook, segment=unit.read)
        return {"row": res.row, "faces": res.faces, "own_frames": own_frame_count(unit, res.frame_times),
                "node_id": self.node_id, "pid": self.pid}  # fmt: skip


def embedded_env() -> dict[str, str]:
    """Environment for a private loopback-only Ray instance.

    Ray 2.60 otherwise advertises (and listens on) the machine's network address. Token
    authentication is always on, whatever ``RAY_AUTH_MODE`` the caller's environment holds (an
    inherited ``disabled`` must not open the instance to every local user): the configured
    token is used (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), else a
    random one that lives only in this process's environment (inherited by the Ray processes
    it starts) and is never logged.
    """
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or (
        Path.home() / ".ray" / "auth_token"
    ).exists()
    if not has_token:
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(24)
    return env


def _reload_auth_config() -> None:
    """Make this process re-read RAY_AUTH_* (Ray caches them when it is imported)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as e:  # another Ray version: it reads them at init
        log.debug("could not refresh Ray's auth settings: %s", e)


@contextlib.contextmanager
def ray_session(cfg: RunConfig) -> Iterator[dict]:
    """Connect to Ray: reuse an initialised one, join ``cfg.ray.address``, or start a private one.

    Without ``cfg.ray.address``, ``RAY_ADDRESS`` is honoured as ``ray.init`` does (inside a
    Ray job it names the job's cluster), and only when neither is set is a private instance
    started. Yields a dict with ``embedded`` and ``address``. Only what this function started
    is shut down (never a cluster it joined).
    """
    if ray.is_initialized():
        yield {"embedded": False, "address": "(already connected)"}
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log.isEnabledFor(logging.DEBUG))
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"--ray-address {address}: cannot connect to Ray: {e}") from e
        try:
            yield {"embedded": False, "address": address}
        finally:
            ray.shutdown()
        return
    # Ray's Unix socket paths must stay under 107 bytes: keep the temp folder short.
    base = "/tmp" if len(tempfile.gettempdir()) > 40 and os.path.isdir("/tmp") else None
    tmp = tempfile.mkdtemp(prefix="fer-batch-ray-", dir=base)
    env = embedded_env()
    ok = False
    rc = ray_constants
    old_flag = rc.ENABLE_RAY_CLUSTER
    try:
        with patched_env(env):
            rc.ENABLE_RAY_CLUSTER = False  # ray was imported before the env var was set
            _reload_auth_config()
            try:
                info = ray.init(
                    address="local",
                    include_dashboard=bool(cfg.ray.dashboard),
                    dashboard_host="127.0.0.1",
                    _temp_dir=tmp,
                    object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                    logging_level=logging.WARNING,
                    log_to_driver=log.isEnabledFor(logging.DEBUG),
                    namespace="fer-batch",
                )
                if cfg.ray.dashboard:  # the token itself is never logged: a file only its owner reads
                    where = ""
                    if "RAY_AUTH_TOKEN" in env:
                        fd = os.open(Path(tmp) / "auth_token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        with os.fdopen(fd, "w") as f:
                            f.write(env["RAY_AUTH_TOKEN"])
                        where = f"; its token is in {Path(tmp) / 'auth_token'} (readable by you only)"
                    log.warning(
                        "Ray dashboard: http://%s (loopback only, token authentication)%s",
                        getattr(info, "dashboard_url", None), where,
                    )  # fmt: skip
                yield {"embedded": True, "address": ray.get_runtime_context().gcs_address, "temp_dir": tmp}
                ok = True
            finally:
                ray.shutdown()
    finally:
        rc.ENABLE_RAY_CLUSTER = old_flag
        _reload_auth_config()  # back to the caller's settings
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.warning("Ray logs of the failed run kept in %s", tmp)


def _worker_count(cfg: RunConfig, n_sources: int, may_split: bool) -> int:
    if cfg.ray.num_workers:
        return int(cfg.ray.num_workers)
    res = ray.cluster_resources()
    cap = math.inf
    if cfg.ray.cpus_per_worker > 0:
        cap = math.floor(res.get("CPU", 0) / cfg.ray.cpus_per_worker + 1e-9)
    if cfg.ray.gpus_per_worker > 0:
        cap = min(cap, math.floor(res.get("GPU", 0) / cfg.ray.gpus_per_worker + 1e-9))
    if cap is math.inf:
        cap = 1
    n = int(cap) if may_split else min(int(cap), n_sources)
    return max(1, n)


@dataclass
class _ActorSlot:
    handle: Any
    ready_ref: Any = None
    ready: bool = False
    busy: Any = None  # ObjectRef of the running unit
    info: dict = field(default_factory=dict)


class RayRunner:
    """Runs units in Ray worker actors; yields their results as they complete (any order).

    Use as a context manager: entering connects to (or starts) Ray, leaving kills the
    workers and shuts down what was started. ``models`` is known once a worker is ready.
    """

    def __init__(self, cfg: RunConfig, device: str, *, may_split: bool = True, n_sources: int = 1):
        self.cfg = cfg
        self.device = device
        self.may_split = may_split
        self.n_sources = n_sources
        self.models: dict[str, Any] = {}
        self.session: dict = {}
        self._stack = contextlib.ExitStack()
        self._slots: list[_ActorSlot] = []

    def __enter__(self) -> "RayRunner":
        if self.device.startswith("cuda") and self.cfg.ray.gpus_per_worker == 0:
            log.warning("a GPU is available but --gpus-per-worker is 0: Ray workers run on CPU")
        self.session = self._stack.enter_context(ray_session(self.cfg))
        return self

    def __exit__(self, *exc) -> None:
        try:
            for s in self._slots:
                _kill(s)
            self._slots = []
        finally:
            self._stack.close()

    def _new_slot(self, remote_cls) -> _ActorSlot:
        h = remote_cls.remote(self.cfg, self.cfg.ray.gpus_per_worker)
        return _ActorSlot(h, ready_ref=h.ready.remote())

    def run(self, units: Iterable[WorkUnit], hook: Hook | None = None) -> Iterator[UnitResult]:
        """Yield one result per unit. Units are pulled from ``units`` only as workers free up."""
        hook = hook or no_hook
        cfg = self.cfg
        n_workers = _worker_count(cfg, self.n_sources, self.may_split) if self.n_sources else 0
        hook("ray_start", {"address": self.session.get("address"), "embedded": self.session.get("embedded"),
                           "workers": n_workers, "sources": self.n_sources})  # fmt: skip
        if not n_workers:
            return
        remote_cls = ray.remote(FerWorker).options(
            num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker, max_restarts=WORKER_MAX_RESTARTS,
            max_task_retries=TASK_MAX_RETRIES, scheduling_strategy="SPREAD", max_concurrency=2,
        )  # fmt: skip
        slots = self._slots
        slots.extend(self._new_slot(remote_cls) for _ in range(n_workers))
        replacements_left = 2 * n_workers
        todo = iter(units)
        queue: deque[WorkUnit] = deque()
        exhausted = False
        attempts: dict[str, int] = {}
        inflight: dict[Any, tuple[_ActorSlot, WorkUnit]] = {}
        clocks = UnitClocks(cfg.source_time_limit())
        nodes: set[str] = set()
        started = time.monotonic()

        def next_unit() -> WorkUnit | None:
            nonlocal exhausted
            if queue:
                return queue.popleft()
            unit = None if exhausted else next(todo, None)
            exhausted = unit is None
            return unit

        def replace_slot(slot: _ActorSlot, always: bool = False) -> None:
            nonlocal replacements_left
            slots.remove(slot)
            _kill(slot)
            if always or replacements_left > 0:
                replacements_left -= 0 if always else 1
                slots.append(self._new_slot(remote_cls))

        def stop_late_units() -> Iterator[UnitResult]:
            """Units past their time limit: their actors are killed and replaced."""
            for ref, full in clocks.expired():
                slot, unit = inflight[ref]
                if cfg.source_timeout == "auto" and not full:  # ask the busy actor for its unit's full limit
                    try:
                        lim = ray.get(slot.handle.limit.remote(unit.key), timeout=LIMIT_QUERY_TIMEOUT_S)
                    except RayError:
                        lim = None
                    if lim is not None and clocks.extend(ref, lim):
                        continue
                lim = clocks.limit(ref)
                del inflight[ref]
                clocks.stop(ref)
                slot.busy = None
                replace_slot(slot, always=True)
                log.warning("%s: timed out after %.0f s (--source-timeout); its worker was replaced", unit.source.path, lim)
                yield timed_out(unit, lim)

        while True:
            for s in slots:  # hand work to every ready, idle worker
                if s.ready and s.busy is None:
                    unit = next_unit()
                    if unit is None:
                        break
                    s.busy = s.handle.run.remote(unit)
                    inflight[s.busy] = (s, unit)
                    clocks.start(s.busy)
            if not inflight and not queue and exhausted:
                break
            waiting = list(inflight) + [s.ready_ref for s in slots if s.ready_ref is not None]
            if not waiting:
                raise FerBatchError("Ray runner: no worker left to run the remaining units")
            ready_refs, _ = ray.wait(waiting, num_returns=1, timeout=clocks.wait_s())
            stopped = list(stop_late_units())  # checked on every pass: other units may keep finishing
            yield from stopped
            if stopped:
                continue
            if not ready_refs:
                if not any(s.ready for s in slots) and time.monotonic() - started > READY_TIMEOUT_S:
                    raise FerBatchError(
                        f"Ray runner: no worker started within {READY_TIMEOUT_S:.0f} s; does the cluster have "
                        f"{cfg.ray.cpus_per_worker} CPU / {cfg.ray.gpus_per_worker} GPU free for one worker?"
                    )
                continue
            ref = ready_refs[0]
            slot = next((s for s in slots if s.ready_ref == ref), None)
            if slot is not None:  # a worker finished loading its models
                slot.ready_ref = None
                try:
                    slot.info = ray.get(ref)
                except RayError as e:
                    log.warning("a Ray worker failed to start: %s", short_error(e))
                    replace_slot(slot)
                    if not slots:
                        raise FerBatchError(f"Ray runner: workers cannot start: {short_error(e)}") from e
                    continue
                slot.ready = True
                self.models = self.models or slot.info["models"]
                hook("worker_ready", dict(slot.info))
                continue
            slot, unit = inflight.pop(ref)
            clocks.stop(ref)
            slot.busy = None
            try:
                meta = ray.get(ref)
                result = UnitResult(unit, meta["row"], meta["own_frames"], meta["faces"], info=meta)
            except RayTaskError as e:  # the unit raised
                result = UnitResult.failed(unit, f"worker error: {short_error(e)}")
            except RayActorError as e:  # the worker died and Ray's retries are spent
                attempts[unit.key] = attempts.get(unit.key, 0) + 1
                replace_slot(slot)
                if attempts[unit.key] < UNIT_MAX_ATTEMPTS:
                    log.warning("%s: worker died (%s); resubmitting", unit.key, short_error(e))
                    queue.appendleft(unit)
                    continue
                result = UnitResult.failed(unit, f"worker process died {attempts[unit.key]} times on this input: {short_error(e)}")
            except RayError as e:  # e.g. its result was lost with a node
                result = UnitResult.failed(unit, f"Ray error: {short_error(e)}")
            if result.info.get("node_id"):
                nodes.add(result.info["node_id"])
            yield result
        log.info("Ray run: %d sources on %d workers across %d node(s)", self.n_sources, n_workers, len(nodes))
        hook("ray_end", {"workers": n_workers, "nodes": sorted(nodes)})


def _kill(slot: _ActorSlot) -> None:
    try:
        ray.kill(slot.handle, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


__all__ = ["RayRunner", "FerWorker", "embedded_env", "ray_session"]
