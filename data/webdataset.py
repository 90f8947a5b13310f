"""WebDataset adapter: tar shards as img2dataset writes them -> typed records.

``--root 'shards/{00000..00099}.tar'`` names the shards (brace ranges keep their zero padding;
``{a,b}`` lists work too; a directory means every ``*.tar`` in it). Inside a shard, files that share
a key (the member name up to the first dot of its base name) form one sample: ``KEY.jpg|.jpeg|
.png|.webp`` is the image, ``KEY.json`` may carry ``category`` (else ``""``); other members (``.txt``,
``.parquet`` beside the tar, ``_stats.json``) are ignored. The image id is the key (img2dataset's keys
are unique across shards; a repeated key is an error). An image's ``path`` is ``TAR::MEMBER`` with the
tar's absolute path (a brace pattern names no single root directory), read by :func:`read_member`. Queries come from an optional triplets CSV/JSONL (``--triplets``, the folder
adapter's format: ``ref``, ``target``, ``caption`` name keys); without one the split is gallery only.
"""

from __future__ import annotations

import functools
import json
import re
import tarfile
from pathlib import Path
from typing import Optional

from cir_mine.data.errors import DataError
from cir_mine.data.records import ImageRecord, QueryRecord

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MEMBER_SEP = "::"
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(spec: str) -> list[str]:
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar']; '{x,y}' -> both; nested left to right."""
    m = _BRACE.search(spec)
    if not m:
        return [spec]
    body, head, tail = m.group(1), spec[: m.start()], spec[m.end() :]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    else:
        choices = body.split(",")
    return [s for c in choices for s in expand_braces(head + c + tail)]


def shard_paths(root: str | Path) -> list[Path]:
    """The tar shards named by ``root`` (a brace pattern, one tar, or a directory of tars), in order."""
    spec = str(root)
    if Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.tar"))
    else:
        paths = [Path(p) for p in expand_braces(spec)]
    if not paths:
        raise DataError(
            f"{root}: no .tar shards. Pass `root` 'DIR/{{00000..00099}}.tar' (img2dataset's output) or a "
            f"directory of .tar files.",
            params=("root",),
        )
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]}: shard not found ({len(missing)} of {len(paths)} shards named by {root} are missing)."
        )
    return [p.resolve() for p in paths]


def sample_key(member: str) -> tuple[str, str]:
    """'dir/000010003.jpg' -> ('dir/000010003', '.jpg'): the key ends at the first dot of the base name."""
    head, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (dot + ext).lower()


def scan_shard(path: Path) -> list[tuple[str, str, str]]:
    """(key, image member, category) per sample of one tar, in member order."""
    images: dict[str, str] = {}
    cats: dict[str, str] = {}
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = sample_key(m.name)
                if ext in IMAGE_EXTENSIONS:
                    images.setdefault(key, m.name)
                elif ext == ".json":
                    try:
                        meta = json.loads(tf.extractfile(m).read())
                    except ValueError:
                        meta = {}
                    if isinstance(meta, dict) and meta.get("category"):
                        cats[key] = str(meta["category"])
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: not a readable tar shard ({e}).") from None
    return [(k, m, cats.get(k, "")) for k, m in images.items()]


@functools.lru_cache(maxsize=8)
def _open_tar(path: str) -> tarfile.TarFile:
    return tarfile.open(path)


def is_member(path: Optional[str]) -> bool:
    return bool(path) and MEMBER_SEP in path


def split_member(path: str) -> tuple[str, str]:
    """``SHARD.tar::MEMBER`` -> (SHARD.tar, MEMBER); the shard's own path may hold ``::`` itself."""
    i = path.rfind(".tar" + MEMBER_SEP)
    if i >= 0:
        return path[: i + 4], path[i + 4 + len(MEMBER_SEP) :]
    tar, _, member = path.partition(MEMBER_SEP)
    return tar, member


def read_member(path: str) -> bytes:
    """The bytes of ``TAR::MEMBER`` (tar files stay open, a few per process). KeyError when absent."""
    tar, member = split_member(path)
    f = _open_tar(tar).extractfile(member)
    if f is None:
        raise KeyError(member)
    return f.read()


def load_webdataset(
    root: str | Path, split: str, triplets: Optional[str | Path] = None
) -> tuple[list[ImageRecord], list[QueryRecord]]:
    """Read the tar shards named by ``root``. Returns (gallery images, queries for ``split``)."""
    from cir_mine.data.folder import _captions, read_rows

    images: list[ImageRecord] = []
    where: dict[str, Path] = {}
    for shard in shard_paths(root):
        for key, member, cat in scan_shard(shard):
            if key in where:
                raise DataError(
                    f"{shard}: key '{key}' also appears in {where[key]}; sample keys must be unique across shards."
                )
            where[key] = shard
            images.append(ImageRecord(key, cat, (), f"{shard}{MEMBER_SEP}{member}"))
    queries: list[QueryRecord] = []
    if triplets is not None:
        path = Path(triplets)
        if not path.exists():
            raise DataError(f"{path}: triplets file not found.")
        category = {im.image_id: im.category for im in images}
        for n, row in enumerate(read_rows(path)):
            ids = []
            for col in ("ref", "target"):
                v = str(row.get(col) or "").strip()
                if v not in category:
                    raise DataError(f"{path}: row {n} '{col}' names key '{v}' that is in none of the shards of {root}.")
                ids.append(v)
            caps = _captions(row, path, n)
            if caps:
                queries.append(
                    QueryRecord(
                        str(row.get("query_id") or f"wds-{split}-{n:05d}"), category[ids[0]], ids[0], ids[1], caps
                    )
                )
    return images, queries
