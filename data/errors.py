"""Typed exceptions. The CLI turns each into one ``Error: ...`` line and an exit code."""
from __future__ import annotations


class CirMineError(Exception):
    """Base class for every expected failure; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class DataError(CirMineError):
    """An input file is missing, malformed, or inconsistent with another input."""


class SchemaError(DataError):
    """A Parquet table does not match its documented schema (see docs/formats.md)."""


class UsageError(CirMineError):
    """A bad option value or combination (exit code 2, like a CLI usage error)."""

    exit_code = 2


class LockedError(CirMineError):
    """Another process holds the lock of a workspace or run directory."""


class WeightsUnavailableError(CirMineError):
    """Pretrained weights cannot be loaded on this (offline) machine."""
