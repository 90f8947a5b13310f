"""One entry point over the dataset adapters."""
from __future__ import annotations

from pathlib import Path

from cir_mine.data.errors import UsageError
from cir_mine.data.records import ImageRecord, QueryRecord, image_file


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
    raise UsageError(f"unknown dataset {name!r}: use fashioniq, cirr or folder.")


def count_image_files(images: list[ImageRecord], root: str | Path) -> int:
    """How many of ``images`` have a path whose file exists (paths are relative to ``root``)."""
    return sum(1 for im in images if im.path and image_file(root, im.path).is_file())


def dataset_summary(name: str, root: str | Path, split: str) -> dict:
    """What ``cir-mine check`` prints: counts of images, image files found on disk, attributes,
    queries, and the categories."""
    images, queries = load_dataset(name, root, split)
    return {"images": len(images), "image_files": count_image_files(images, root),
            "with_attributes": sum(1 for i in images if i.attributes), "queries": len(queries),
            "categories": sorted({q.category for q in queries})}
