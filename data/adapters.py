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
    if name == "webdataset":
        from cir_mine.data.webdataset import load_webdataset

        return load_webdataset(root, split, **kw)
    raise UsageError(f"unknown dataset {name!r}: use fashioniq, cirr, folder or webdataset.")


def count_image_files(images: list[ImageRecord], root: str | Path) -> int:
    """How many of ``images`` have a path whose file exists (paths are relative to ``root``; a
    webdataset ``TAR::MEMBER`` path counts when its tar exists)."""
    from cir_mine.data.webdataset import is_member, split_member

    def exists(path: str) -> bool:
        f = image_file(root, split_member(path)[0] if is_member(path) else path)
        return f.is_file()

    return sum(1 for im in images if im.path and exists(im.path))


def dataset_summary(name: str, root: str | Path, split: str) -> dict:
    """What ``cir-mine check`` prints: counts of images, image files found on disk, attributes,
    queries, and the categories."""
    images, queries = load_dataset(name, root, split)
    return {
        "images": len(images),
        "image_files": count_image_files(images, root),
        "with_attributes": sum(1 for i in images if i.attributes),
        "queries": len(queries),
        "categories": sorted({q.category for q in queries}),
    }
