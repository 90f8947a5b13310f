"""The workspace: the on-disk contract between every stage (see docs/formats.md).

A workspace directory holds, per split, ``gallery.{split}.parquet`` (or a folder
``gallery.{split}/part-*.parquet`` of row-aligned parts, read as one gallery in part-name order) and
``triplets.{split}.parquet``, optionally ``index.{split}.faiss``, and one ``manifest.json``. Every table is validated on read:
a wrong column, dtype or dimension, or NaN/unnormalized embeddings raise :class:`SchemaError`
naming the file and the column. The tables' schemas live in :mod:`cir_mine.data.schema`, their
readers and writers in :mod:`cir_mine.data.gallery` and :mod:`cir_mine.data.triplets`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cir_mine.data import digest
from cir_mine.data.atomic import write_json_atomic
from cir_mine.data.digest import file_digest, file_fingerprint, hash_of, opened
from cir_mine.data.embeddings import (
    advise_random,
    check_embeddings,
    embedding_array,
    embedding_numpy,
    l2_normalize,
    open_embeddings,
    read_block,
    release_pages,
    write_embeddings_npy,
)
from cir_mine.data.errors import DataError, SchemaError, UsageError
from cir_mine.data.files import check_readable_file
from cir_mine.data.outputs import param_name
from cir_mine.data.gallery import (
    PART_GLOB,
    Gallery,
    gallery_from_table,
    gallery_part_files,
    gallery_table,
    read_gallery,
    write_gallery_parts,
)
from cir_mine.data.journal import discard, transaction
from cir_mine.data.parquet import read_metadata, read_parquet_schema, write_table
from cir_mine.data.provenance import library_versions, now_iso
from cir_mine.data.schema import embedding_type, gallery_schema, triplets_schema
from cir_mine.data.triplets import (
    Triplets,
    check_triplets_against_gallery,
    read_triplets,
    triplets_from_table,
    triplets_table,
)

__all__ = [
    "SCHEMA_VERSION",
    "SPLIT_RE",
    "Workspace",
    "check_split",
    "file_digest",
    "file_fingerprint",
    # the tables of a workspace, re-exported: cir_mine.data.gallery, .triplets, .embeddings, .schema
    "Gallery",
    "Triplets",
    "PART_GLOB",
    "gallery_from_table",
    "gallery_part_files",
    "gallery_table",
    "read_gallery",
    "write_gallery_parts",
    "check_triplets_against_gallery",
    "read_triplets",
    "triplets_from_table",
    "triplets_table",
    "advise_random",
    "check_embeddings",
    "embedding_array",
    "embedding_numpy",
    "l2_normalize",
    "open_embeddings",
    "read_block",
    "release_pages",
    "write_embeddings_npy",
    "embedding_type",
    "gallery_schema",
    "triplets_schema",
    "read_metadata",
    "write_table",
    "library_versions",
    "now_iso",
    "check_readable_file",
]

SCHEMA_VERSION = 1
SPLIT_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class Workspace:
    """A workspace directory. Tables are validated when read."""

    MANIFEST = "manifest.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def from_arrays(cls, gallery_emb, image_ids, **kw) -> "Workspace":
        """An in-memory workspace of one split from numpy arrays; no file is read or written.

        See :func:`cir_mine.data.arrays.workspace_from_arrays` for the arguments."""
        from cir_mine.data.arrays import workspace_from_arrays

        return workspace_from_arrays(gallery_emb, image_ids, **kw)

    # paths
    def gallery_path(self, split: str) -> Path:
        """``gallery.{split}.parquet``, or the parts folder ``gallery.{split}/`` when only it exists."""
        f = self.gallery_file(split)
        d = self.gallery_dir(split)
        return d if d.is_dir() and not f.exists() else f

    def gallery_file(self, split: str) -> Path:
        return self.root / f"gallery.{check_split(split)}.parquet"

    def gallery_dir(self, split: str) -> Path:
        return self.root / f"gallery.{check_split(split)}"

    def gallery_files(self, split: str) -> list[Path]:
        """The Parquet file(s) of a split's gallery, in row order."""
        p = self.gallery_path(split)
        return gallery_part_files(p) if p.is_dir() else [p]

    def write_gallery(self, split: str, table: pa.Table | Iterable[pa.Table], metadata: Optional[dict] = None) -> Path:
        """Write a split's gallery atomically: one table -> the single file, several (an iterable, consumed
        one at a time) -> a parts folder.
        The other form, if present, is removed afterwards (:func:`cir_mine.data.io.discard`), so a split
        never has both; inside a transaction a failure puts the old form back."""
        with transaction():
            if isinstance(table, pa.Table):
                write_table(table, self.gallery_file(split), metadata)
                if self.gallery_dir(split).is_dir():
                    discard(self.gallery_dir(split))
                return self.gallery_file(split)
            write_gallery_parts(table, self.gallery_dir(split), metadata)
            if os.path.lexists(self.gallery_file(split)):
                discard(self.gallery_file(split))
            return self.gallery_dir(split)

    def triplets_path(self, split: str) -> Path:
        return self.root / f"triplets.{check_split(split)}.parquet"

    def index_path(self, split: str) -> Path:
        return self.root / f"index.{check_split(split)}.faiss"

    def embeddings_path(self, split: str) -> Path:
        """``gallery.{split}.npy``: the gallery's embeddings as a row-aligned array (optional)."""
        return self.root / f"gallery.{check_split(split)}.npy"

    @property
    def manifest_path(self) -> Path:
        return self.root / self.MANIFEST

    def require(self) -> "Workspace":
        if not self.root.is_dir():
            raise DataError(
                f"{self.root}: workspace directory not found. Create one with `cir-mine synth` or "
                f"`cir-mine embed`, or point work at an existing workspace.",
                params=("work",),
            )
        return self

    def splits(self) -> list[str]:
        """Split names of the ``gallery.{split}.parquet`` files and ``gallery.{split}/`` part folders; a
        stray ``gallery.*.parquet`` whose split is not a valid name (e.g. ``gallery.train copy.parquet``)
        is a DataError naming it."""
        out = set()
        for p in self.root.glob("gallery.*.parquet"):
            if p.is_dir():
                continue
            name = p.name[len("gallery.") : -len(".parquet")]
            if not SPLIT_RE.match(name):
                raise DataError(
                    f"{p}: not a split table (split names use letters, digits, '-' or '_'). "
                    f"Rename or move it out of {self.root}."
                )
            out.add(name)
        out |= {
            p.name[len("gallery.") :]
            for p in self.root.glob("gallery.*")
            if p.is_dir() and SPLIT_RE.match(p.name[len("gallery.") :])
        }
        return sorted(out)

    def _require_split(self, split: str, path: Path) -> None:
        self.require()
        if os.path.lexists(path) and not path.is_dir():  # a gallery may be a folder of parts
            check_readable_file(path)  # a dangling link or a symlink loop is named as such
        if not path.exists():
            have = ", ".join(self.splits()) or "none"
            raise DataError(
                f"{path}: file not found; splits in {self.root}: {have}. Pass one with `split`.", params=("split",)
            )

    # tables
    def gallery(self, split: str, check_norm: bool = True) -> Gallery:
        p = self.gallery_path(split)
        self._require_split(split, p)
        if self.gallery_file(split).exists() and self.gallery_dir(split).is_dir():
            raise DataError(
                f"{self.root}: split '{split}' has both {self.gallery_file(split).name} and the parts "
                f"folder {self.gallery_dir(split).name}/; remove the one that is out of date."
            )
        npy = self.embeddings_path(split)
        if (
            npy.exists()
            and p.is_file()
            and "embedding" in read_parquet_schema(p).names
            and npy.stat().st_mtime_ns < p.stat().st_mtime_ns
        ):
            raise SchemaError(
                f"{npy}: older than {p}, so it may hold other embeddings. Rewrite it with "
                f"`cir-mine index work={self.root} split={split} npy`, or delete it.",
                params=("work", "split", "npy"),
            )
        g = read_gallery(p, check_norm=check_norm, embeddings_path=npy if npy.exists() else None)
        if len(g) == 0:
            raise DataError(
                f"{p}: the gallery is empty (0 rows). Re-embed the split or choose another with `split`.",
                params=("split",),
            )
        dim = self.manifest().get("dim")
        if dim is not None and g.dim != int(dim):
            raise SchemaError(f"{p}: column 'embedding' has dimension {g.dim} but {self.manifest_path} says {dim}.")
        return g

    def triplets(self, split: str, gallery: Optional[Gallery] = None, check_norm: bool = True) -> Triplets:
        p = self.triplets_path(split)
        if not p.exists() and self.gallery_path(split).exists():
            raise DataError(
                f"{p}: file not found: {self.root} holds the gallery of split '{split}' but no queries "
                f"(features only). Add queries: write {p.name} in the triplets schema (query_id, category, ref_id, "
                f"target_id, captions, text_embedding from the features' encoder; docs/formats.md), or embed "
                f"images and captions with `cir-mine embed dataset=fashioniq|cirr|folder root=ROOT "
                f"work={self.root} split={split}`.",
                params=("dataset", "root", "work", "split"),
            )
        self._require_split(split, p)
        dim = gallery.dim if gallery is not None else self.manifest().get("dim")
        t = read_triplets(p, dim=dim, check_norm=check_norm)
        if len(t) == 0:
            raise DataError(
                f"{p}: no queries (0 rows). Re-embed the split or choose another with `split`.", params=("split",)
            )
        if gallery is not None:
            check_triplets_against_gallery(t, gallery)
        return t

    def load(self, split: str) -> tuple[Gallery, Triplets]:
        """The split's gallery and triplets, validated, as one version: the split's hash is taken before
        and after reading, and a split rewritten meanwhile (another process replaced a table) is a
        DataError, so what a reader holds is always the data of ``gallery.data_hash``."""
        # the split's files are opened here, before the reads open them, and hashed on a thread of
        # its own beside the reads (hashlib releases the GIL): a table replaced in between makes
        # the check after the reads fail, never a hash of newer files than the ones read. A
        # folder of more parts than OPEN_TO_HASH is hashed first, one file open at a time.
        inputs = self._hash_inputs(split)
        with ThreadPoolExecutor(1, thread_name_prefix="cir-mine-hash") as pool:
            if sum(not isinstance(i, bytes) for i in inputs) <= digest.OPEN_TO_HASH:
                hashing = pool.submit(hash_of, opened(inputs))
            else:
                hashing = Future()
                hashing.set_result(hash_of(inputs))
            try:
                g = self.gallery(split)
                t = self.triplets(split, gallery=g)
            except DataError:
                self.check_unchanged(split, hashing.result())  # tables of two versions disagree: name the cause
                raise
            before = hashing.result()
        self.check_unchanged(split, before)
        g.data_hash = before
        g.file_digest = self._gallery_digest(split, g)  # hashed above, unchanged since (a cache hit)
        pa.default_memory_pool().release_unused()  # the Parquet read's buffers and lookup hash tables
        return g, t

    def versioned_gallery(self, split: str) -> Gallery:
        """:meth:`gallery`, with ``file_digest`` set where the gallery is one file that the read left
        unchanged (hashed on a thread beside the read and again after it, as :meth:`load` does)."""
        with ThreadPoolExecutor(1, thread_name_prefix="cir-mine-hash") as pool:
            hashing = pool.submit(self._gallery_digest, split)
            g = self.gallery(split)
            before = hashing.result()
        if before is not None and self._gallery_digest(split, g) == before:
            g.file_digest = before
        return g

    def _gallery_digest(self, split: str, g: Optional[Gallery] = None) -> Optional[str]:
        """:func:`file_digest` of ``gallery.{split}.parquet``, the one file ``g``'s rows were read
        from; None for a gallery folder, or rows whose embeddings come from ``gallery.{split}.npy``
        (memory-mapped: the table's bytes do not cover them)."""
        p = self.gallery_path(split)
        if not p.is_file() or (g is not None and type(g.embeddings) is not np.ndarray):
            return None
        return file_digest(p)

    def summary(self) -> dict:
        """Validate every split and return {root, manifest, hash, splits: {split: {images, triplets, categories}}}."""
        self.require()
        splits = {}
        for split in self.splits():
            g = self.gallery(split)
            t = self.triplets(split, gallery=g) if self.triplets_path(split).exists() else None
            splits[split] = {
                "images": len(g),
                "triplets": 0 if t is None else len(t),
                "categories": sorted(set(g.categories.tolist())),
            }
        return {"root": self.root, "manifest": self.manifest(), "hash": self.manifest_hash(), "splits": splits}

    def image_root(self, split: str) -> Optional[Path]:
        """The dataset root the gallery ``path`` column of ``split`` is relative to, as recorded by
        ``cir-mine embed`` (absolute), or None when the workspace does not record one."""
        if not self.manifest_path.exists():
            return None
        root = ((self.manifest().get("embed") or {}).get(split) or {}).get("root")
        return Path(root) if root else None

    # manifest
    def manifest(self) -> dict:
        if self.manifest_path.exists():
            try:
                m = json.loads(self.manifest_path.read_text())
            except ValueError as e:
                raise DataError(f"{self.manifest_path}: malformed JSON ({e}).") from None
            if not isinstance(m, dict):
                raise DataError(f"{self.manifest_path}: expected a JSON object.")
            version = m.get("schema_version")
            if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
                raise DataError(
                    f"{self.manifest_path}: 'schema_version' must be a positive integer, found {version!r}. "
                    f"Repair the manifest, or delete it to derive one from the tables."
                )
            if version is not None and version > SCHEMA_VERSION:
                raise DataError(
                    f"{self.manifest_path}: schema_version {version} is newer than this cir-mine reads "
                    f"({SCHEMA_VERSION}). Upgrade cir-mine to read this workspace."
                )
            dim = m.get("dim")
            if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
                raise DataError(
                    f"{self.manifest_path}: 'dim' must be a positive integer, found {dim!r}. Repair the "
                    f"manifest, or delete it to derive one from the tables."
                )
            return m
        return self.derive_manifest()

    def derive_manifest(self) -> dict:
        """A manifest computed from the tables' footers (for workspaces made without one)."""
        self.require()
        counts, dim = {}, None
        for kind in ("gallery", "triplets"):
            col = "embedding" if kind == "gallery" else "text_embedding"
            tables = [
                (p.name[: -len(".parquet")], [p]) for p in sorted(self.root.glob(f"{kind}.*.parquet")) if p.is_file()
            ]
            if kind == "gallery":  # parts folders count as one table
                tables += [
                    (p.name, sorted(p.glob(PART_GLOB)))
                    for p in sorted(self.root.glob("gallery.*"))
                    if p.is_dir() and SPLIT_RE.match(p.name[len("gallery.") :])
                ]
            for name, files in sorted(tables):
                mds = [pq.read_metadata(f) for f in files]
                counts[name] = sum(md.num_rows for md in mds)
                for md in mds[:1]:
                    sch = md.schema.to_arrow_schema()
                    if col in sch.names and pa.types.is_fixed_size_list(sch.field(col).type):
                        dim = dim or sch.field(col).type.list_size
        return {
            "schema_version": SCHEMA_VERSION,
            "derived": True,
            "dim": dim,
            "counts": counts,
            "encoder": {"name": "unknown"},
            "source": "unknown",
        }

    def manifest_hash(self) -> str:
        """The identity of the workspace's data: the manifest without its times and library versions,
        plus a digest of the bytes of every gallery and triplets table. A byte-identical rebuild has
        the same hash; new features or triplets change it."""
        m = {k: v for k, v in self.manifest().items() if k not in ("updated", "created", "versions")}
        m["content"] = {
            p.name: file_digest(p)
            for kind in ("gallery", "triplets")
            for p in sorted(self.root.glob(f"{kind}.*.parquet"))
        }
        return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]

    def split_hash(self, split: str) -> str:
        """Identity of one split's data: a hash over ``gallery.{split}.parquet`` (or each part of the
        folder ``gallery.{split}/``) and ``triplets.{split}.parquet`` (each file's content,
        :func:`file_fingerprint`). Other splits and the manifest do not enter it, so embedding
        another split leaves it unchanged; rewriting this split's tables changes it."""
        return hash_of(self._hash_inputs(split))

    def _hash_inputs(self, split: str) -> list:
        """What :meth:`split_hash` hashes, in order: bytes, and the paths of the split's files (each
        hashed by :func:`file_fingerprint`)."""
        inputs: list = [check_split(split).encode()]
        for p in (self.gallery_path(split), self.triplets_path(split)):
            inputs.append(f"|{p.name}|".encode())
            if p.is_dir():  # a gallery folder: every part, in row order
                for part in sorted(p.glob(PART_GLOB)):
                    inputs += [f"|{part.name}|".encode(), part]
            elif p.exists():
                inputs.append(p)
        return inputs

    def check_unchanged(self, split: str, data_hash: Optional[str], while_: str = "read") -> None:
        """DataError when the split's data is no longer the version ``data_hash`` (another process
        rewrote a table of it after it was read); None checks nothing."""
        if data_hash is not None and self.split_hash(split) != data_hash:
            raise DataError(
                f"{self.root}: split '{split}' changed while it was {while_} (another process rewrote "
                f"{self.gallery_path(split).name} or {self.triplets_path(split).name}). Run the command "
                f"again once that writer is done."
            )

    def check_new_split(self, split: str, dim: Optional[int], overwrite: bool, flag: str = "work") -> None:
        """Before writing split ``split`` with dimension ``dim``: refuse an existing split without
        ``overwrite`` and a dimension other than the other splits' (UsageError; ``dim=None``: no check;
        ``flag``: the parameter that names the workspace, see :func:`cir_mine.data.outputs.param_name`)."""
        flag = param_name(flag)
        mine = (self.gallery_path(split), self.triplets_path(split))
        if not overwrite:
            for p in mine:
                if p.exists():
                    raise UsageError(
                        f"`{flag}` {self.root}: split '{split}' exists ({p.name}). Pass `overwrite` to "
                        f"replace it, or choose another `split` or `{flag}`.",
                        params=(flag, "overwrite", "split"),
                    )
        if dim is None or not self.root.is_dir():
            return
        for kind, col in (("gallery", "embedding"), ("triplets", "text_embedding")):
            for p in sorted(self.root.glob(f"{kind}.*.parquet")):
                if p in mine:
                    continue
                try:
                    t = pq.read_schema(p).field(col).type
                except (KeyError, pa.ArrowInvalid, OSError):
                    continue  # unreadable tables are reported by the readers
                if pa.types.is_fixed_size_list(t) and t.list_size != dim:
                    raise UsageError(
                        f"{flag} {self.root}: {p.name} has d={t.list_size}; a '{split}' split with "
                        f"d={dim} would make the workspace unreadable. Use the same encoder (d="
                        f"{t.list_size}), or write to another {flag}.",
                        params=(flag,),
                    )

    def write_manifest(self, **fields) -> dict:
        """Merge ``fields`` into the manifest and refresh counts/dim from the tables."""
        base = self.manifest() if self.manifest_path.exists() else {}
        derived = self.derive_manifest()
        m = {**base, **fields}
        m["schema_version"] = SCHEMA_VERSION
        m["counts"] = derived["counts"]
        m["dim"] = derived["dim"] if derived["dim"] is not None else m.get("dim")
        m.setdefault("created", now_iso())
        m.setdefault("encoder", {"name": "unknown"})
        m.setdefault("source", "unknown")
        m["versions"] = library_versions()
        m.pop("derived", None)
        write_json_atomic(self.manifest_path, m)
        return m


def check_split(split: str) -> str:
    from cir_mine.data.errors import UsageError

    if not SPLIT_RE.match(split or ""):
        raise UsageError(f"invalid split name {split!r}: use letters, digits, '-' or '_' (e.g. train, val).")
    return split
