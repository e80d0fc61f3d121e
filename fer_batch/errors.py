"""Typed errors. Input problems raise these; ``assert`` is never used for input checks."""

from __future__ import annotations


class FerBatchError(Exception):
    """Base class of every error fer-batch raises on purpose."""


class InputError(FerBatchError):
    """An input path is missing, unreadable, or not a media file we can use."""


class DecodeError(FerBatchError):
    """A media file could not be decoded (at all, or from some frame on)."""


class ModelError(FerBatchError):
    """A model file, card or pack is missing, corrupt, or does not match its card."""


class ConfigError(FerBatchError):
    """A configuration value is invalid (a usage error: exit code 2)."""


class DataError(FerBatchError):
    """A training or evaluation dataset is unusable (empty class, one class, label mismatch)."""


class OutputError(FerBatchError):
    """An output location cannot be written, or holds data of another schema version."""


class Terminated(BaseException):
    """SIGTERM arrived (systemd, Kubernetes, ``kill``): raised in the main thread so that every
    ``finally`` runs (temp files removed, the incremental state saved), like ``KeyboardInterrupt``
    for Ctrl-C. Not an ``Exception``: no "one bad input" handler swallows it."""


# Exit codes of every command (documented in README.md, "Exit codes").
EXIT_OK = 0  # every input ok / partial / skipped (or nothing to do)
EXIT_FAILED = 1  # some input failed; everything else was written
EXIT_USAGE = 2  # usage, configuration or output error; nothing or little was done
EXIT_LOCKED = 3  # --incremental: another run holds the dataset's lock
EXIT_INTERNAL = 4  # an unexpected internal error (a bug): traceback on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): completed sources kept, the rest redone next time
EXIT_TERMINATED = 143  # SIGTERM: the same, exit code 128 + 15 as a shell reports it
