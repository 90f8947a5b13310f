"""One entry point over the dataset adapters."""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .records import ImageRecord, QueryRecord


def load_dataset(name: str, root: str | Path, split: str, **kw) -> tuple[list[ImageRecord], list[QueryRecord]]:
    if name == "fashioniq":
        from .fashioniq import load_fashioniq

        return load_fashioniq(root, split, **kw)
    if name == "cirr":
        from .cirr import load_cirr

        return load_cirr(root, split)
    if name == "folder":
        from .folder import load_folder  # provided by the embed issue

        return load_folder(root, split, **kw)
    raise UsageError(f"unknown dataset {name!r}: use fashioniq, cirr or folder.")
