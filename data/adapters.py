"""One entry point over the dataset adapters."""
from __future__ import annotations

from pathlib import Path

from cir_mine.data.errors import UsageError
from cir_mine.data.records import ImageRecord, QueryRecord


def load_dataset(name: str, root: str | Path, split: str, **kw) -> tuple[list[ImageRecord], list[QueryRecord]]:
    if name == "fashioniq":
        from cir_mine.data.fashioniq import load_fashioniq

        return load_fashioniq(root, split, **kw)
    if name == "cirr":
        from cir_mine.data.cirr import load_cirr

        return load_cirr(root, split)
    if name == "folder":
        from cir_mine.data.folder import load_folder

        return load_folder(root, split, **kw)
    if name == "webdataset":
        from cir_mine.data.webdataset import load_webdataset

        return load_webdataset(root, split, **kw)
    raise UsageError(f"unknown dataset {name!r}: use fashioniq, cirr, folder or webdataset.")
