"""Ray-free helpers of the runners: per-unit wall-clock limits (``--source-timeout``), an
environment patch, short error texts.

``UnitClocks`` keeps, for each running unit, when it started and its limit (an ``auto`` limit
starts as the base and grows once the worker has opened the media and knows its length);
``timed_out`` is the one ``failed`` result both runners yield when they stop a unit.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Hashable, Iterator

from fer_batch.plan import UnitResult, WorkUnit


def timed_out(unit: WorkUnit, limit: float) -> UnitResult:
    """The result of a unit stopped at its limit (the reason names the file)."""
    return UnitResult.failed(unit, f"{os.fsdecode(unit.source.path)}: timed out after {limit:.0f} s (--source-timeout)")


class UnitClocks:
    """Start time and limit of each running unit, keyed by anything hashable (a Ray ObjectRef)."""

    def __init__(self, base_limit: float | None):
        self.base = base_limit  # None: no limits
        self._c: dict[Hashable, tuple[float, float | None, bool]] = {}

    def start(self, key: Hashable) -> None:
        self._c[key] = (time.monotonic(), self.base, False)

    def extend(self, key: Hashable, limit: float) -> bool:
        """Set a unit's full limit (its media's length is known); True if it has time left."""
        t0, _, _ = self._c[key]
        self._c[key] = (t0, float(limit), True)
        return time.monotonic() < t0 + limit

    def stop(self, key: Hashable) -> None:
        self._c.pop(key, None)

    def limit(self, key: Hashable) -> float | None:
        return self._c[key][1]

    def expired(self) -> list[tuple[Hashable, bool]]:
        """Units past their limit, each with whether its full limit is known."""
        now = time.monotonic()
        return [(k, full) for k, (t0, lim, full) in self._c.items() if lim is not None and now >= t0 + lim]

    def wait_s(self, longest: float = 30.0) -> float:
        """How long to block before the next limit passes (at most ``longest``)."""
        ends = [t0 + lim for t0, lim, _ in self._c.values() if lim is not None]
        return longest if not ends else max(0.05, min(longest, min(ends) - time.monotonic()))


def no_hook(step: str, payload: dict) -> None:
    return None


@contextlib.contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def short_error(e: BaseException, limit: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


__all__: list[Any] = ["UnitClocks", "timed_out", "no_hook", "patched_env", "short_error"]
