"""fer-batch: batch facial-emotion recognition for videos and image folders."""

from __future__ import annotations

from fer_batch.version import __version__

__all__ = ["__version__", "process"]


def process(inputs, out=None, **options):
    """Process videos / images into per-face emotion rows. Mirrors ``fer-batch process``.

    See :func:`fer_batch.api.process` for the options.
    """
    # Imported on use, so that ``import fer_batch.schema`` (a report reader, say) does not
    # load the pipeline and its models' runtimes. No module of the package imports this one.
    from fer_batch.api import process as _process

    return _process(inputs, out=out, **options)
