"""The ``fer-batch`` command line: thin Typer subcommands over the Python API.

Each area registers its own commands through a ``register(app)`` function in the modules
listed in ``COMMAND_MODULES`` (so areas do not edit one shared file).
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
import threading
import traceback

import typer

app = typer.Typer(
    name="fer-batch",
    help="Batch facial-emotion recognition: videos and image folders to per-face emotion time series.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that define ``register(app)``; order is the order of --help.
COMMAND_MODULES = [
    "fer_batch.commands.process_cmd",
    "fer_batch.commands.models_cmd",
    "fer_batch.commands.doctor_cmd",
    "fer_batch.commands.bench_cmd",
    "fer_batch.commands.report_cmd",
    "fer_batch.commands.sample_cmd",
    "fer_batch.commands.train_cmd",
]


def _register_all() -> None:
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(app)


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-v info, -vv debug)."),
) -> None:
    from fer_batch.commands.console import SafeFormatter

    level = logging.WARNING - 10 * min(verbose, 2)
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


_signals: list[int] = []


def _on_signal(signum, frame) -> None:
    """SIGTERM -> ``Terminated``, SIGINT -> ``KeyboardInterrupt``, raised in the main thread so
    every ``finally`` runs (temp files removed, incremental state and run summary saved). A
    second signal while that cleanup runs is ignored (a supervisor's SIGKILL still ends it)."""
    from fer_batch.errors import Terminated

    first = not _signals
    _signals.append(signum)
    if first:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns its exit code (table in README.md, "Exit codes")."""
    from fer_batch.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated

    _register_all()
    _signals.clear()
    installed = threading.current_thread() is threading.main_thread()
    if installed:
        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as e:  # typer exits through SystemExit; return its code for the API
        if _signals:  # click turns Ctrl-C into "Aborted!" and exit code 1: say what happened
            return EXIT_TERMINATED if _signals[0] == signal.SIGTERM else EXIT_INTERRUPTED
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except Terminated:
        sys.stderr.write("fer-batch: terminated (SIGTERM); completed work kept, temp files removed\n")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - a bug: say so, with its own exit code (not "an input failed")
        traceback.print_exc()
        sys.stderr.write(f"fer-batch: internal error (exit code {EXIT_INTERNAL}); please report it with the traceback above\n")
        return EXIT_INTERNAL
    finally:
        if installed:
            for s, h in old.items():
                signal.signal(s, h)
    return 0


if __name__ == "__main__":
    sys.exit(main())
