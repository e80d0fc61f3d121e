"""Process helpers for the tests that stop or kill runs (Linux ``/proc``)."""

from __future__ import annotations

from pathlib import Path

WORKER = "fer_batch.runners.child"  # the local runner's worker process (its command line names this module)


def _stat(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat after the command name: state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def workers_of(pid: int) -> list[int]:
    """Live (not zombie) worker processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            state, ppid = _stat(d.name)[:2]
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(ppid) == pid and state != "Z" and WORKER.encode() in cmd:
            out.append(int(d.name))
    return out


def gone(pid: int) -> bool:
    """The process has exited (no longer in /proc, or a zombie waiting for its parent)."""
    try:
        return _stat(pid)[0] == "Z"
    except (OSError, IndexError):
        return True
