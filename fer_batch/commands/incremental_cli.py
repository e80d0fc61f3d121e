"""Terminal side of ``fer-batch process ... --incremental`` (the engine is fer_batch.incremental).

Prints one line per input that was processed, failed or skipped, and a closing line; the
progress bar only when not ``--quiet``. Unchanged inputs are counted (and listed with ``-v``
and in the run summary JSON). Returns the exit code: 0 ok, 1 some input failed, 2 usage or
output error, 3 another run holds the lock.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fer_batch.commands.console import esc as escape
from fer_batch.config import RunConfig
from fer_batch.errors import FerBatchError
from fer_batch.incremental import (
    EXIT_LOCKED,
    EXIT_USAGE,
    RUNS_DIR,
    IncrementalDataset,
    LockHeldError,
)

log = logging.getLogger(__name__)

_COLOUR = {"new": "green", "changed": "cyan", "failed": "red", "skipped": "dim", "unchanged": "dim"}


def run_incremental_cli(
    inputs: Sequence[str],
    out: str,
    cfg: RunConfig,
    *,
    quiet: bool,
    wait_lock: float,
    retry_failed: bool,
    err: Console,
    progress: Callable[..., Callable[[str, dict], None]] | None = None,
) -> int:
    """Run incrementally into the dataset ``out`` and report on ``err``; return the exit code.

    ``progress(rich_progress, n_sources)`` makes the progress hook (none: no progress bar).
    """
    try:
        with IncrementalDataset(out, wait_lock=wait_lock) as ds:
            plan = ds.plan(list(inputs), cfg, retry_failed=retry_failed)
            for o in plan.outcomes:
                if o["outcome"] == "unchanged":
                    log.info("unchanged %s (%s)", o["path"], o.get("note") or o.get("part"))
            if plan.work:
                err.print(
                    f"run {plan.run_id}: {len(plan.work)} input(s) to process "
                    f"({sum(w.outcome == 'new' for w in plan.work)} new, "
                    f"{sum(w.outcome == 'changed' for w in plan.work)} changed)",
                    soft_wrap=True,
                )
            if quiet or not plan.work or progress is None:
                result = ds.execute(plan, cfg)
            else:
                cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
                with Progress(*cols, console=err, transient=True) as p:
                    result = ds.execute(plan, cfg, hook=progress(p, len(plan.work)))
    except LockHeldError as e:
        err.print(f"[yellow]locked:[/yellow] {escape(str(e))}", soft_wrap=True)
        return EXIT_LOCKED
    except FerBatchError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
        return EXIT_USAGE

    for o in result.outcomes:
        if o["outcome"] in ("unchanged", "skipped"):  # counted below; listed with -v and in the run summary
            if o["outcome"] == "skipped":
                log.info("skipped   %s: %s", o["path"], o.get("error"))
            continue
        what = o["outcome"]
        detail = o.get("error") or ""
        if what in ("new", "changed"):
            detail = f"{o['status']}, {o.get('rows', 0)} rows -> {o.get('part')}" + (f" ({o['error']})" if o.get("error") else "")
            if what == "changed":
                detail += f" [{o.get('reason')}]"
        err.print(f"[{_COLOUR.get(what, '')}]{what:<9}[/] {escape(str(o['path']))}: {escape(detail)}", soft_wrap=True)
    c = result.counts
    where = f"{result.dataset}/{RUNS_DIR}/{result.run_id}.json"
    if result.summary["nothing_to_do"]:
        err.print(
            f"nothing to do: {c['unchanged']} input(s) unchanged"
            + (f" ({c['failed_before_unchanged']} of them failed before)" if c["failed_before_unchanged"] else "")
            + (f", {c['skipped']} skipped" if c["skipped"] else "")
            + (f", {c['failed']} failed" if c["failed"] else "")
            + f" ({result.summary['wall_s']:.1f} s); summary: {escape(where)}",
            soft_wrap=True,
        )
    else:
        err.print(
            f"done: {c['new']} new, {c['changed']} changed, {c['unchanged']} unchanged, {c['failed']} failed, "
            f"{c['skipped']} skipped; {result.summary['rows_written']} rows written "
            f"({result.summary['wall_s']:.1f} s); summary: {escape(where)}",
            soft_wrap=True,
        )
    return result.exit_code
