"""An in-memory workspace built from numpy arrays (``Workspace.from_arrays``).

The arrays go through the same Arrow tables and the same validation as the files of an on-disk
workspace (docs/formats.md), so every stage that takes a :class:`~cir_mine.data.workspace.Workspace`
(``mine_negatives`` first) reads it unchanged and gets the same rows as from the same data on disk.
Nothing is written; :meth:`ArrayWorkspace.save` writes it as a workspace directory when wanted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cir_mine.data.embeddings import array_bytes
from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.io import write_job
from cir_mine.data.validate import check_ids, check_labels, check_matrix
from cir_mine.data.workspace import (
    SCHEMA_VERSION,
    Gallery,
    Triplets,
    Workspace,
    check_split,
    check_triplets_against_gallery,
    gallery_from_table,
    gallery_table,
    triplets_from_table,
    triplets_table,
    write_table,
)

WHERE = "Workspace.from_arrays"


class ArrayWorkspace(Workspace):
    """A workspace of one split held in memory. ``root`` is a label (``<arrays>``), not a folder."""

    def __init__(self, split: str, gallery: Gallery, triplets: Optional[Triplets], encoder: str = "unknown"):
        self.root = Path("<arrays>")
        self.split = split
        self._gallery, self._triplets = gallery, triplets
        self._manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": "arrays",
            "encoder": {"name": encoder},
            "dim": gallery.dim,
            "counts": {f"gallery.{split}": len(gallery), **({f"triplets.{split}": len(triplets)} if triplets else {})},
            "content_hash": _content_hash(gallery, triplets),
        }

    # paths are labels used in messages; none of them exists
    def gallery_path(self, split: str) -> Path:
        return Path(f"{WHERE}(split={check_split(split)!r}) gallery")

    def triplets_path(self, split: str) -> Path:
        return Path(f"{WHERE}(split={check_split(split)!r}) queries")

    def index_path(self, split: str) -> Path:
        return Path(f"{WHERE}(split={check_split(split)!r}) index")

    def require(self) -> "ArrayWorkspace":
        return self

    def splits(self) -> list[str]:
        return [self.split]

    def _check(self, split: str) -> None:
        if split != self.split:
            raise DataError(
                f"{WHERE}: split {split!r} is not in this workspace (it holds {self.split!r}); "
                f"pass split={split!r} to Workspace.from_arrays or mine split {self.split!r}."
            )

    def gallery(self, split: str, check_norm: bool = True) -> Gallery:
        self._check(split)
        return self._gallery

    def triplets(self, split: str, gallery: Optional[Gallery] = None, check_norm: bool = True) -> Triplets:
        self._check(split)
        if self._triplets is None:
            raise DataError(
                f"{WHERE}: no queries; pass ref_ids, target_ids, text_emb and captions "
                f"to Workspace.from_arrays to mine negatives."
            )
        return self._triplets

    def load(self, split: str) -> tuple[Gallery, Triplets]:
        return self.gallery(split), self.triplets(split)

    def manifest(self) -> dict:
        return dict(self._manifest)

    def split_hash(self, split: str) -> str:
        """Identity of the split's data: the hash of the arrays."""
        self._check(split)
        return self._manifest["content_hash"]

    def image_root(self, split: str) -> Optional[Path]:
        """None: relative ``paths`` are relative to the folder NegativesDataset is given (``root=``)."""
        return None

    def derive_manifest(self) -> dict:
        return self.manifest()

    def write_manifest(self, **fields) -> dict:
        raise UsageError(f"{WHERE}: an in-memory workspace writes no files; save it first with ws.save(DIR).")

    def save(self, root: str | Path) -> Workspace:
        """Write this workspace as a directory (gallery, triplets, manifest.json) -> the on-disk Workspace."""
        ws = Workspace(root)
        if ws.gallery_path(self.split).exists():
            raise DataError(f"{ws.gallery_path(self.split)}: already exists; save into a new directory.")
        g, t = self._gallery, self._triplets
        with write_job(ws.root, "Workspace.save"):
            write_table(
                gallery_table(
                    g.image_ids.tolist(),
                    g.categories.tolist(),
                    g.attributes,
                    g.embeddings,
                    paths=None if g.paths is None else g.paths.tolist(),
                ),
                ws.gallery_path(self.split),
            )
            if t is not None:
                write_table(_triplets_arrow(t), ws.triplets_path(self.split))
            ws.write_manifest(source="arrays", encoder=dict(self._manifest["encoder"]))
        return ws


def _triplets_arrow(t: Triplets):
    extra = t.extra_positive_ids if any(t.extra_positive_ids) else None
    verified = t.verified_negative_ids if any(t.verified_negative_ids) else None
    return triplets_table(
        t.query_ids.tolist(),
        t.categories.tolist(),
        t.ref_ids.tolist(),
        t.target_ids.tolist(),
        t.captions,
        t.text_embeddings,
        extra_positive_ids=extra,
        verified_negative_ids=verified,
    )


def _content_hash(g: Gallery, t: Optional[Triplets]) -> str:
    h = hashlib.sha256()
    for part in (g.image_ids, g.categories):
        h.update("\x00".join(part.tolist()).encode())
    h.update(array_bytes(g.embeddings))
    if t is not None:
        for part in (t.query_ids, t.ref_ids, t.target_ids):
            h.update("\x00".join(part.tolist()).encode())
        h.update(array_bytes(t.text_embeddings))
    return h.hexdigest()[:16]


def _matrix(x, name: str, normalize: bool, ids=None, what: str = "image") -> np.ndarray:
    """The one validator of outside arrays (:func:`cir_mine.data.validate.check_matrix`)."""
    return check_matrix(x, f"{WHERE}: {name}", ids=ids, what=what, normalize=normalize)


def _strings(x, name: str, n: int, ids: bool = True) -> list:
    out = list(x)
    if len(out) != n:
        raise UsageError(f"{WHERE}: {name} has {len(out)} entries; expected {n} (one per row).")
    where = f"{WHERE}: {name}"
    return check_ids(out, where, "id", unique=False) if ids else check_labels(out, where, "entry")


def _lists(x, name: str, n: int) -> list:
    out = [[v] if isinstance(v, str) else list(v) for v in x]
    if len(out) != n:
        raise UsageError(f"{WHERE}: {name} has {len(out)} entries; expected {n} (one per query).")
    return out


def workspace_from_arrays(
    gallery_emb,
    image_ids: Sequence[str],
    *,
    categories: Optional[Sequence[str]] = None,
    attributes: Optional[Sequence[Sequence[str]]] = None,
    paths: Optional[Sequence[str]] = None,
    ref_ids: Optional[Sequence[str]] = None,
    target_ids: Optional[Sequence[str]] = None,
    text_emb=None,
    captions: Optional[Sequence] = None,
    query_ids: Optional[Sequence[str]] = None,
    query_categories: Optional[Sequence[str]] = None,
    extra_positive_ids: Optional[Sequence[Sequence[str]]] = None,
    split: str = "train",
    normalize: bool = False,
    encoder: str = "unknown",
) -> ArrayWorkspace:
    """An in-memory workspace of one split (see docs/api.md).

    gallery_emb: float[n, d] image embeddings (L2-normalized, or pass ``normalize=True``);
    image_ids: str[n]; categories: str[n] (default ""); attributes: n lists of ``group:value``
    strings (default none); paths: str[n] image files (for NegativesDataset's images). Queries (all four or none): ref_ids, target_ids: str[m] gallery ids;
    text_emb: float[m, d]; captions: m strings or lists of strings. query_ids: str[m] (default
    ``{split}-{i:06d}``); query_categories: str[m] (default the reference's category);
    extra_positive_ids: m lists of other correct targets. Raises UsageError for a wrong shape,
    dtype or length, SchemaError/DataError as the on-disk reader does for the same data.
    """
    check_split(split)
    n = np.shape(gallery_emb)[0] if np.ndim(gallery_emb) else 0
    ids = _strings(image_ids, "image_ids", n) if n else list(image_ids)
    emb = _matrix(gallery_emb, "gallery_emb", normalize, ids=ids)
    cats = _strings(categories, "categories", n, ids=False) if categories is not None else [""] * n
    attrs = _lists(attributes, "attributes", n) if attributes is not None else [[] for _ in range(n)]
    paths = _strings(paths, "paths", n, ids=False) if paths is not None else None
    gallery = gallery_from_table(gallery_table(ids, cats, attrs, emb, paths=paths), Path(f"{WHERE}(gallery_emb)"))
    given = {"ref_ids": ref_ids, "target_ids": target_ids, "text_emb": text_emb, "captions": captions}
    if all(v is None for v in given.values()):
        return ArrayWorkspace(split, gallery, None, encoder)
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise UsageError(
            f"{WHERE}: queries need ref_ids, target_ids, text_emb and captions; {', '.join(missing)} missing."
        )
    if np.ndim(text_emb) == 2 and np.shape(text_emb)[1] != emb.shape[1]:
        raise UsageError(
            f"{WHERE}: text_emb has dimension {np.shape(text_emb)[1]} but gallery_emb has {emb.shape[1]}; "
            f"both must come from the same encoder."
        )
    temb = _matrix(text_emb, "text_emb", normalize, what="query")
    m = temb.shape[0]
    refs, tgts = _strings(ref_ids, "ref_ids", m), _strings(target_ids, "target_ids", m)
    qids = _strings(query_ids, "query_ids", m) if query_ids is not None else [f"{split}-{i:06d}" for i in range(m)]
    if query_categories is not None:
        qcats = _strings(query_categories, "query_categories", m, ids=False)
    else:
        row = gallery.row_of
        qcats = [gallery.categories[row[r]] if r in row else "" for r in refs]
    caps = _lists(captions, "captions", m)
    extra = _lists(extra_positive_ids, "extra_positive_ids", m) if extra_positive_ids is not None else None
    table = triplets_table(qids, qcats, refs, tgts, caps, temb, extra_positive_ids=extra)
    triplets = triplets_from_table(table, Path(f"{WHERE}(text_emb)"), dim=gallery.dim)
    check_triplets_against_gallery(triplets, gallery)
    return ArrayWorkspace(split, gallery, triplets, encoder)
