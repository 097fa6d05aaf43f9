"""Exceptions raised by the data layer; each carries one self-contained line."""

from __future__ import annotations

from metassl.errors import DataError

__all__ = ["DataError", "DataConfigError", "DatasetNotFoundError", "CorruptImageError"]


class DataConfigError(DataError, ValueError):
    """A data config has unknown keys or invalid values."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """Dataset files are missing (or incomplete) and were not downloaded."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class CorruptImageError(DataError, RuntimeError):
    """An image or dataset file exists but cannot be decoded."""
