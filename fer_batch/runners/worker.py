"""A worker process for the local runner: the units run there, so a time limit can stop them.

Python threads cannot be stopped, and a decoder can hang in C code or crash the whole
process (a segfault or abort in FFmpeg, an out-of-memory kill). The local runner therefore
runs its units in one child process (``python -m fer_batch.runners.child``) that loads the
models once and then runs units one at a time. The parent

* gives each unit a wall-clock limit (``RunConfig.source_time_limit``: known in full once the
  child has opened the media and reports its length) and SIGKILLs the child when it passes:
  the unit is ``failed`` ("timed out after N s") and a fresh child is started for the next
  unit (models load again, outside any unit's clock);
* records a unit as ``failed`` when the child dies under it (signal or exit code named), and
  goes on with a fresh child;
* receives the child's hook calls and log records, so progress bars and logging work as
  in-process.

The child dies with its parent (``PR_SET_PDEATHSIG`` = SIGKILL on Linux, and it exits when
the parent's end of the socket closes), so after a ``kill -9`` of the run nothing keeps
working or writing. It is started with ``subprocess`` (not ``multiprocessing``), so it
inherits no open files (the incremental dataset's lock stays the parent's) and never
re-imports the caller's ``__main__``.

Messages (pickled over a socket pair, ``multiprocessing.connection.Connection``):
parent -> child ``("setup", cfg, device, log_level)``, ``("run", unit)``, ``("stop",)``;
child -> parent ``("ready", models)``, ``("setup_error", exc)``, ``("log", record)``,
``("hook", step, payload)``, ``("limit", seconds)``, ``("result", row, faces, own_frames, pid)``,
``("error", message)``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from types import SimpleNamespace
from typing import Any

from fer_batch.config import RunConfig
from fer_batch.errors import FerBatchError
from fer_batch.pipeline import Hook
from fer_batch.plan import UnitResult, WorkUnit, unit_media_seconds
from fer_batch.runners.support import timed_out

log = logging.getLogger(__name__)

# How long a fresh worker may take to load its models before the run gives up.
READY_TIMEOUT_S = 600.0
# How long the parent waits for a stopped worker to exit before killing it.
STOP_GRACE_S = 5.0


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def death_reason(returncode: int | None) -> str:
    """How a worker process ended, in words ("killed by SIGSEGV", "exited with code 3")."""
    if returncode is None:
        return "stopped responding"
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode)}"
    return f"exited with code {returncode}"


class WorkerProcess:
    """The parent's handle on one worker process (see the module docstring)."""

    def __init__(self, cfg: RunConfig, device: str):
        self.cfg = cfg
        self.device = device
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.models: dict[str, Any] = {}
        self.busy = False  # a unit is running (stopping then means killing: Ctrl-C, SIGTERM)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "WorkerProcess":
        """Start the child and wait until its models are loaded (raises the child's setup error)."""
        ours, theirs = socket.socketpair()
        try:
            try:
                out = sys.stderr.fileno()  # the child's stray prints must not reach our stdout
            except (AttributeError, OSError, ValueError):
                out = subprocess.DEVNULL
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fer_batch.runners.child", str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=out,
            )  # fmt: skip
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(("setup", self.cfg, self.device, logging.getLogger().getEffectiveLevel()))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            msg = self._recv(deadline)
            if msg is None:
                reason = death_reason(self._exit_code())
                self.kill()
                raise FerBatchError(f"the worker process {reason} while loading the models")
            if msg[0] == "ready":
                self.models = msg[1]
                return self
            if msg[0] == "setup_error":
                self.kill()
                raise msg[1]
            self._side_message(msg, None, None)

    def stop(self) -> None:
        """Ask an idle child to exit (kill it if it does not); kill a busy one at once."""
        if self.proc is None:
            return
        if self.busy:
            self.kill()
            return
        try:
            if self.conn is not None:
                self.conn.send(("stop",))
            self.proc.wait(STOP_GRACE_S)
        except (OSError, EOFError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the child (idempotent) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process SIGKILL cannot stop
                log.warning("worker process %d did not exit after SIGKILL", self.proc.pid)
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.proc = None

    def _exit_code(self, wait_s: float = 5.0) -> int | None:
        """The child's exit status once it is gone (it may close its socket just before)."""
        try:
            return self.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            return None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ one unit
    def run(self, unit: WorkUnit, hook: Hook) -> tuple[UnitResult, bool]:
        """Run one unit; returns (result, whether this worker is still usable)."""
        assert self.conn is not None and self.proc is not None
        self.busy = True
        try:
            return self._run(unit, hook)
        finally:
            self.busy = False

    def _run(self, unit: WorkUnit, hook: Hook) -> tuple[UnitResult, bool]:
        name = os.fsdecode(unit.source.path)
        limit = self.cfg.source_time_limit()  # the whole limit, or (auto) the part before the media is open
        start = time.monotonic()
        try:
            self.conn.send(("run", unit))
        except OSError:
            return UnitResult.failed(unit, f"{name}: the worker process {death_reason(self.proc.poll())}"), False
        while True:
            deadline = None if limit is None else start + limit
            msg = self._recv(deadline)
            if msg is None:
                if self.proc.poll() is None and deadline is not None and time.monotonic() >= deadline:
                    self.kill()
                    log.warning("%s: timed out after %.0f s (--source-timeout); worker stopped", name, limit)
                    return timed_out(unit, limit), False
                reason = death_reason(self._exit_code())
                self.kill()
                log.warning("%s: the worker process %s while processing it", name, reason)
                return UnitResult.failed(unit, f"{name}: the worker process {reason} while processing this input"), False
            kind = msg[0]
            if kind == "limit":
                limit = msg[1]
            elif kind == "result":
                _, row, faces, own_frames, pid = msg
                return UnitResult(unit, row, own_frames, faces, info={"pid": pid}), True
            elif kind == "error":
                return UnitResult.failed(unit, msg[1]), True
            else:
                self._side_message(msg, unit, hook)

    # ------------------------------------------------------------------ messages
    def _recv(self, deadline: float | None):
        """The next message, or None when the child is gone or ``deadline`` (monotonic) passed."""
        conn = self.conn
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                return None
            try:
                if conn.poll(wait):
                    return conn.recv()
            except (EOFError, OSError):
                return None
            if self.proc.poll() is not None and not _pending(conn):
                return None

    def _side_message(self, msg: tuple, unit: WorkUnit | None, hook: Hook | None) -> None:
        if msg[0] == "log":
            rec = logging.makeLogRecord(msg[1])
            logging.getLogger(rec.name).handle(rec)
        elif msg[0] == "hook" and hook is not None and unit is not None:
            _, step, payload = msg
            payload = dict(payload, source=unit.source)
            if "planned_frames" in payload:  # what the progress bar reads from the reader
                payload["reader"] = SimpleNamespace(planned_frames=payload.pop("planned_frames"),
                                                    decoder=payload.pop("decoder", None))  # fmt: skip
            hook(step, payload)


def _pending(conn: Connection) -> bool:
    try:
        return conn.poll(0)
    except (EOFError, OSError):
        return False


# ============================================================================ the child


class _PipeLogHandler(logging.Handler):
    """Sends log records to the parent, whose handlers format and filter them."""

    def __init__(self, send):
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            self.send(("log", {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                               "msg": msg, "created": record.created, "process": record.process}))  # fmt: skip
        except Exception:  # noqa: BLE001 - logging must never break the work
            pass


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the closed socket still ends us
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def child_main(fd: int, parent_pid: int) -> int:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    conn = Connection(fd)
    lock = threading.Lock()  # the decode thread logs too

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(send)]
    try:
        _, cfg, device, level = conn.recv()
    except (EOFError, OSError):
        return 0
    root.setLevel(level)
    from fer_batch.pipeline import Stages, process_source
    from fer_batch.plan import own_frame_count

    try:
        stages = Stages(cfg, device).setup()
        stages.use_reid  # noqa: B018 - raises here when --reid on cannot work
        models = stages.models_info()
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
        try:
            send(("setup_error", e))
        except Exception:  # noqa: BLE001 - unpicklable: send its text
            send(("setup_error", FerBatchError(f"{type(e).__name__}: {e}")))
        return 1
    send(("ready", models))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg[0] != "run":
            break
        unit: WorkUnit = msg[1]

        def hook(step: str, payload: dict, unit=unit) -> None:
            small = {k: v for k, v in payload.items() if k not in ("source", "reader")}
            if step == "source_open":
                reader = payload.get("reader")
                frames = int(getattr(reader, "planned_frames", 0) or 0)
                small["planned_frames"] = frames
                small["decoder"] = getattr(reader, "decoder", None)
                limit = cfg.source_time_limit(unit_media_seconds(unit, cfg, payload.get("duration_s")), frames)
                send(("limit", limit))
            send(("hook", step, small))

        try:
            res = process_source(unit.source, stages, cfg, hook=hook, segment=unit.read)
            send(("result", res.row, res.faces, own_frame_count(unit, res.frame_times), os.getpid()))
        except Exception as e:  # noqa: BLE001 - one bad item must never stop the batch
            logging.getLogger("fer_batch.runners.local").exception("%s: failed", unit.source.path)
            send(("error", f"{type(e).__name__}: {e}"))
    stages.teardown()
    return 0

