"""Precomputed features into a workspace: ``cir-mine index --from-features F.npy|F.parquet|FOLDER``.

The features are L2-normalized and written as ``gallery.{split}.parquet``, then the split's index.
A FOLDER in clip-retrieval's layout (``img_emb/img_emb_{i}.npy`` with row-aligned
``metadata/metadata_{i}.parquet``, how LAION's precomputed CLIP embeddings ship) becomes a gallery
folder ``gallery.{split}/part-{i}.parquet``, one part per embedding file, converted one file at a time.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa

from cir_mine.data.errors import DataError, SchemaError, UsageError
from cir_mine.data.io import read_parquet, same_file, write_job
from cir_mine.data.validate import check_ids, check_labels, check_matrix
from cir_mine.data.workspace import Workspace, check_readable_file, check_split, gallery_table

from cir_mine.miner.core.search.build import check_spec
from cir_mine.miner.encode.index import index_workspace, write_gallery_npy

log = logging.getLogger(__name__)


def read_features(path: str | Path, ids_path: Optional[str | Path] = None) -> tuple[list[str], list[str], np.ndarray]:
    """Features file -> (image_ids, categories, emb float32[n, d] with unit rows), checked by the one
    validator of outside arrays (:mod:`cir_mine.data.validate`).

    ``.npy`` float[n, d] with ``ids_path`` (one ``image_id`` per line, optionally ``\\tcategory``),
    or ``.parquet`` with ``image_id``, ``embedding`` (list<float>) and optional ``category``.
    """

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: features file not found.")
    if path.suffix == ".npy":
        if ids_path is None:
            raise UsageError(
                f"from_features {path}: a .npy file needs ids FILE (one image id per line).",
                params=("from_features", "ids"),
            )
        emb = load_npy(path)
        check_readable_file(Path(ids_path))
        try:
            text = Path(ids_path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{ids_path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}). "
                f"Write one image id per line in UTF-8."
            ) from None
        lines = [ln for ln in text.splitlines() if ln.strip()]
        parts = [ln.split("\t", 1) for ln in lines]
        ids = [p[0].strip() for p in parts]
        cats = [p[1].strip() if len(p) > 1 else "" for p in parts]
        where_ids = str(ids_path)
    elif path.suffix == ".parquet":
        t = read_parquet(path)
        for col in ("image_id", "embedding"):
            if col not in t.schema.names:
                raise SchemaError(f"{path}: missing column '{col}'; a features table needs image_id and embedding.")
        ids = t.column("image_id").to_pylist()
        cats = (
            check_labels(t.column("category").to_pylist(), str(path))
            if "category" in t.schema.names
            else [""] * len(ids)
        )
        emb = _embedding_column(t, path)
        where_ids = str(path)
    else:
        raise UsageError(
            f"from_features {path}: use a .npy (with ids) or a .parquet file.", params=("from_features", "ids")
        )
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise DataError(
            f"{path}: features have shape {emb.shape} but there are {len(ids)} ids; expected one row per id."
        )
    ids = check_ids(ids, where_ids, categories=cats)
    return ids, cats, check_matrix(emb, str(path), ids=ids)


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """One ``.npy`` array (no pickled objects), or DataError naming the file."""
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(
            f"{path}: not a readable .npy array of numbers ({str(e).splitlines()[0]}). Save "
            f"float32[n, d] with numpy.save."
        ) from None
    if not isinstance(a, np.ndarray):
        raise DataError(f"{path}: holds several arrays (.npz), expected one .npy array.")
    return a


def _embedding_column(t: pa.Table, path: Path) -> np.ndarray:
    """The ``embedding`` column of a features table -> float[n, d]; null, ragged or non-numeric rows refused."""
    import pyarrow.compute as pc

    col = t.column("embedding").combine_chunks()
    ty = col.type
    if not (
        pa.types.is_list(ty) or pa.types.is_large_list(ty) or pa.types.is_fixed_size_list(ty)
    ) or not pa.types.is_floating(ty.value_type):
        raise SchemaError(f"{path}: column 'embedding' has type {ty}, expected a list of floats (one vector per row).")
    ids = t.column("image_id")
    if col.null_count:
        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{path}: column 'embedding' is null in row {i} (image id {ids[i]}). Every row needs its "
            f"vector; drop the row or compute it."
        )
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        i = int(np.flatnonzero(lengths != lengths[0])[0])
        raise DataError(
            f"{path}: column 'embedding' has {lengths[i]} values in row {i} (image id {ids[i]}) but "
            f"{lengths[0]} in row 0; every vector needs the same dimension."
        )
    flat = col.flatten()
    if flat.null_count:
        i = int(
            np.searchsorted(
                np.cumsum(lengths), int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]), side="right"
            )
        )
        raise DataError(
            f"{path}: column 'embedding' holds a null value in row {i} (image id {ids[i]}). Recompute that vector."
        )
    d = int(lengths[0]) if len(lengths) else 0
    return flat.to_numpy(zero_copy_only=False).reshape(-1, d) if d else np.zeros((len(col), 0), np.float32)


CLIP_RETRIEVAL_ID_COLUMNS = ("image_id", "key", "image_path", "url")  # the first present names the image


def clip_retrieval_files(folder: Path) -> list[tuple[Path, Path]]:
    """(img_emb_{i}.npy, metadata_{i}.parquet) pairs of a clip-retrieval folder, in numeric order of i.

    Checks before anything is converted: every embedding file has its metadata file and both have
    the same number of rows; one dimension throughout; real floating-point numbers."""
    import pyarrow.parquet as pq

    emb_dir, meta_dir = folder / "img_emb", folder / "metadata"
    num = lambda p: int(re.search(r"_(\d+)$", p.stem).group(1))  # noqa: E731
    embs = sorted((p for p in emb_dir.glob("img_emb_*.npy") if re.search(r"_\d+$", p.stem)), key=num)
    if not embs:
        raise DataError(
            f"{folder}: not a clip-retrieval embedding folder (no img_emb/img_emb_N.npy files). "
            f"Pass a .npy with ids, a .parquet, or a folder with img_emb/ and metadata/.",
            params=("ids",),
        )
    pairs, dim = [], None
    for e in embs:
        m = meta_dir / f"metadata_{num(e)}.parquet"
        if not m.exists():
            raise DataError(f"{m}: file not found; {e.name} needs its row-aligned metadata file.")
        arr = load_npy(e, mmap=True)
        if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"{e}: dtype {arr.dtype}, expected floating point (float16 or float32).")
        rows = read_parquet_rows(m)
        if arr.ndim != 2 or arr.shape[0] != rows:
            raise DataError(
                f"{e}: shape {arr.shape} does not match the {rows} rows of {m.name}; the files must be row-aligned."
            )
        if dim is not None and arr.shape[1] != dim:
            raise DataError(f"{e}: dimension {arr.shape[1]}, but {embs[0].name} has {dim}.")
        dim = arr.shape[1]
        names = pq.read_schema(m).names
        if not any(c in names for c in CLIP_RETRIEVAL_ID_COLUMNS):
            raise SchemaError(
                f"{m}: no id column; a clip-retrieval metadata file needs one of "
                f"{', '.join(CLIP_RETRIEVAL_ID_COLUMNS)}."
            )
        pairs.append((e, m))
    return pairs


def read_parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    from cir_mine.data.io import read_parquet_schema

    read_parquet_schema(path)  # a readable Parquet file, or SchemaError naming it
    return pq.read_metadata(path).num_rows


def clip_retrieval_ids(pairs: list[tuple[Path, Path]]) -> tuple[list[list[str]], list[list[str]]]:
    """The ids and categories of every part, read from the metadata files alone and checked (ids:
    non-empty strings, unique within a category across all parts; categories: strings)."""
    import pyarrow.parquet as pq

    ids, cats = [], []
    for _, m in pairs:
        col = next(c for c in CLIP_RETRIEVAL_ID_COLUMNS if c in pq.read_schema(m).names)
        t = read_parquet(m, columns=[col, "category"])
        ids.append(check_ids(t.column(col).to_pylist(), str(m), unique=False))
        cats.append(
            check_labels(t.column("category").to_pylist(), str(m))
            if "category" in t.schema.names
            else [""] * t.num_rows
        )
    check_ids([i for part in ids for i in part], str(pairs[0][1].parent), categories=[c for part in cats for c in part])
    return ids, cats


def clip_retrieval_parts(
    pairs: list[tuple[Path, Path]], ids: list[list[str]], cats: list[list[str]], carry
) -> Iterator[pa.Table]:
    """Gallery tables, one per (embeddings, metadata) pair: float16/float32 rows checked and L2-normalized
    to float32 (:func:`cir_mine.data.validate.check_matrix`); tags, paths and attribute scores carried
    over from the split's current gallery (``carry``, see :class:`CarryOver`)."""
    for (e, _), pid, pcat in zip(pairs, ids, cats):
        emb = check_matrix(load_npy(e), str(e), rows=len(pid), ids=pid)
        yield carry.table(pid, pcat, emb)


def check_encoder_change(ws: Workspace, encoder_name: str) -> None:
    """Refuse features from another encoder than the one the workspace's triplets were embedded with
    (their text embeddings would be compared with image features of another space)."""
    old = ((ws.manifest().get("encoder") or {}).get("name") or "unknown") if ws.manifest_path.exists() else "unknown"
    triplets = sorted(p.name for p in ws.root.glob("triplets.*.parquet"))
    if triplets and old != "unknown" and encoder_name != old:
        raise DataError(
            f"{ws.root}: {', '.join(triplets)} hold text embeddings from encoder '{old}', but these features come "
            f"from '{encoder_name}'. Pass encoder_name {old} if the features come from it, or "
            f"allow_encoder_change to import them anyway (then re-embed the triplets).",
            params=("encoder_name", "allow_encoder_change"),
        )


class CarryOver:
    """Categories, attributes (tags), paths and attribute scores of the split's current gallery (a file
    or a parts folder), read once, lent to the imported ids it holds (matched by (category, id), or
    by id alone where the features give no category)."""

    def __init__(self, ws: Workspace, split: str):
        from cir_mine.data.workspace import read_gallery

        p = ws.gallery_path(split)
        self.old = read_gallery(p, check_norm=False) if p.exists() else None
        self.scores = None
        if self.old is not None:
            given = [read_parquet(f, columns=["attribute_scores"]) for f in ws.gallery_files(split)]
            if given[0].num_columns:
                self.scores = [v for t in given for v in t.column(0).to_pylist()]

    def lend(self, ids: list, cats: list) -> tuple[list, list, Optional[list], Optional[list]]:
        """-> (categories, attributes, paths or None, attribute_scores or None) for ``ids``."""
        old = self.old
        empty = [[] for _ in ids]
        if old is None:
            return cats, empty, None, None
        rows = [old.key_row.get((c, i)) if c else old.row_of.get(i) for i, c in zip(ids, cats)]
        if all(r is None for r in rows):
            return cats, empty, None, None
        cats = [c or (old.categories[r] if r is not None else "") for c, r in zip(cats, rows)]
        attrs = [list(old.attributes[r]) if r is not None else [] for r in rows]
        paths = [old.paths[r] or "" if r is not None else "" for r in rows] if old.paths is not None else None
        scores = (
            [list(self.scores[r] or []) if r is not None else [] for r in rows] if self.scores is not None else None
        )
        return cats, attrs, paths, scores

    def table(self, ids: list, cats: list, emb: np.ndarray) -> pa.Table:
        """A gallery table of ``ids`` with what the current gallery lends them."""
        cats, attrs, paths, scores = self.lend(ids, cats)
        table = gallery_table(ids, cats, attrs, emb, paths=paths)
        if scores is not None:
            table = table.append_column(
                pa.field("attribute_scores", pa.list_(pa.float32())), pa.array(scores, pa.list_(pa.float32()))
            )
        return table


def check_triplets_kept(ws: Workspace, split: str, ids: set, source) -> None:
    """The split's triplets must still find every reference and target among the imported ids
    (else every reader of the workspace would refuse it)."""
    p = ws.triplets_path(split)
    if not p.exists():
        return
    t = read_parquet(p, columns=["query_id", "ref_id", "target_id"])
    if not {"query_id", "ref_id", "target_id"} <= set(t.schema.names):
        return  # a malformed table is named by its reader
    qids = t.column("query_id").to_pylist()
    for col in ("ref_id", "target_id"):
        vals = t.column(col).to_pylist()
        missing = [i for i, v in enumerate(vals) if v not in ids]
        if missing:
            n = len({vals[i] for i in missing})
            raise DataError(
                f"{source}: the features have no row for {n} image(s) that {p} names as '{col}' (first: "
                f"{vals[missing[0]]}, query {qids[missing[0]]}). Import features for every reference and "
                f"target of the triplets, or drop those triplets first."
            )


def import_features(
    work: str | Path,
    split: str,
    path: str | Path,
    ids_path: Optional[str | Path] = None,
    encoder_name: str = "unknown",
    index: str = "flat",
    device: str = "auto",
    fp16: bool = False,
    allow_encoder_change: bool = False,
    overwrite: bool = True,
    npy: Optional[str] = None,
) -> dict:
    """Write ``gallery.{split}.parquet`` from precomputed features (L2-normalized here), then the index
    (``index`` 'none': no index) and, with ``npy`` (a dtype), the memory-mapped ``gallery.{split}.npy``;
    a clip-retrieval folder becomes the parts folder ``gallery.{split}/``.

    The split's current gallery lends its categories, attributes (tags), paths and attribute scores
    to the ids it shares with the features (every format). Features from another encoder than the
    workspace's triplets are refused unless ``allow_encoder_change``. Everything is validated
    before anything is replaced: the features (:mod:`cir_mine.data.validate`: real floats, finite,
    non-zero, ids as non-empty strings, one id per row, no duplicated id within a category, the
    workspace's dimension), every reference and target of the split's triplets among the ids, and
    the spec of the index; the features file is never one of the files it replaces. All or nothing
    (the gallery, index and manifest appear together; the old gallery comes back on any failure).
    """
    check_split(split)
    ws = Workspace(work)
    job = "cir-mine index --from-features"
    if Path(path).is_dir():
        pairs = clip_retrieval_files(Path(path))
        dim = int(load_npy(pairs[0][0], mmap=True).shape[1])
        if not allow_encoder_change:
            check_encoder_change(ws, encoder_name)
        ws.check_new_split(split, None, overwrite)
        _check_feature_dim(ws, split, path, dim)
        ids, cats = clip_retrieval_ids(pairs)
        check_triplets_kept(ws, split, {i for part in ids for i in part}, path)
        if index != "none":
            check_spec(index, sum(len(p) for p in ids), dim)
        with write_job(ws.root, job):
            parts = clip_retrieval_parts(pairs, ids, cats, CarryOver(ws, split))
            ws.write_gallery(split, parts, metadata={"features": str(path), "layout": "clip-retrieval"})
            meta = _index_imported(ws, split, index, device, fp16, npy)
            ws.write_manifest(source="features", encoder={"name": encoder_name, "dim": dim})
            return meta or {}
    for p in (path, ids_path):
        if p is not None:
            check_readable_file(Path(p))
            for target in (ws.gallery_path(split), ws.manifest_path, ws.index_path(split)):
                if same_file(p, target):
                    raise UsageError(
                        f"{p}: is the file this command replaces ({target}). Copy it elsewhere and import the copy."
                    )
    ids, cats, emb = read_features(path, ids_path)
    _check_feature_dim(ws, split, path, int(emb.shape[1]))
    if not allow_encoder_change:
        check_encoder_change(ws, encoder_name)
    ws.check_new_split(split, None, overwrite)
    check_triplets_kept(ws, split, set(ids), path)
    if index != "none":
        check_spec(index, len(ids), int(emb.shape[1]))
    with write_job(ws.root, job):
        ws.write_gallery(split, CarryOver(ws, split).table(ids, cats, emb), metadata={"features": str(path)})
        meta = _index_imported(ws, split, index, device, fp16, npy)
        ws.write_manifest(source="features", encoder={"name": encoder_name, "dim": int(emb.shape[1])})
        return meta or {}


def _index_imported(ws: Workspace, split: str, index: str, device: str, fp16: bool, npy: Optional[str]):
    """Inside the import's transaction: the memory-mapped embeddings (with ``npy``) and the index
    (unless ``index`` is 'none'); returns the index meta or None."""
    if index == "none":
        if npy:
            write_gallery_npy(ws, split, npy)
        return None
    return index_workspace(ws.root, split, index, device=device, fp16=fp16, lock=False, npy=npy)


def _check_feature_dim(ws: Workspace, split: str, path, dim: int) -> None:
    """The features' dimension must be the workspace's (its other tables, this split's triplets)."""
    import pyarrow.parquet as pq

    if not ws.root.is_dir():
        return
    tables = [
        p
        for p in sorted(ws.root.glob("*.*.parquet"))
        if p.name.startswith(("gallery.", "triplets.")) and p != ws.gallery_path(split)
    ]
    for p in tables:
        col = "embedding" if p.name.startswith("gallery.") else "text_embedding"
        try:
            t = pq.read_schema(p).field(col).type
        except (KeyError, pa.ArrowInvalid, OSError):
            continue
        if pa.types.is_fixed_size_list(t) and t.list_size != dim:
            raise DataError(
                f"{path}: features have d={dim} but {p} has d={t.list_size}. Import features of the "
                f"workspace's encoder, or use another work.",
                params=("work",),
            )
