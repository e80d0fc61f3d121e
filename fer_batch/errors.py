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
