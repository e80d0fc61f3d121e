"""The ``fer-batch`` command line: thin Typer subcommands over the Python API.

Each area registers its own commands through a ``register(app)`` function in the modules
listed in ``COMMAND_MODULES`` (so areas do not edit one shared file).
"""

from __future__ import annotations

import importlib
import logging
import sys

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


def main(argv: list[str] | None = None) -> int:
    _register_all()
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as e:  # typer exits through SystemExit; return its code for the API
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
