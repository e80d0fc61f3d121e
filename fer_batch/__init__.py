"""fer-batch: batch facial-emotion recognition for videos and image folders."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "process"]


def process(inputs, out=None, **options):
    """Process videos / images into per-face emotion rows. Mirrors ``fer-batch process``.

    See :func:`fer_batch.api.process` for the options.
    """
    from fer_batch.api import process as _process

    return _process(inputs, out=out, **options)
