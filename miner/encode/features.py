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
from cir_mine.data.workspace import Workspace, check_readable_file, check_split, gallery_table, l2_normalize

from cir_mine.miner.encode.index import check_index_spec, index_workspace

log = logging.getLogger(__name__)


def read_features(path: str | Path, ids_path: Optional[str | Path] = None
                  ) -> tuple[list[str], list[str], np.ndarray]:
    """Features file -> (image_ids, categories, emb float32[n, d] as stored).

    ``.npy`` float[n, d] with ``ids_path`` (one ``image_id`` per line, optionally ``\\tcategory``),
    or ``.parquet`` with ``image_id``, ``embedding`` (list<float>) and optional ``category``.
    """

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: features file not found.")
    if path.suffix == ".npy":
        if ids_path is None:
            raise UsageError(f"--from-features {path}: a .npy file needs --ids FILE (one image id per line).")
        emb = np.load(path, allow_pickle=False)
        lines = [ln for ln in Path(ids_path).read_text(encoding="utf-8").splitlines() if ln.strip()]
        parts = [ln.split("\t", 1) for ln in lines]
        ids = [p[0].strip() for p in parts]
        cats = [p[1].strip() if len(p) > 1 else "" for p in parts]
    elif path.suffix == ".parquet":
        t = read_parquet(path)
        for col in ("image_id", "embedding"):
            if col not in t.schema.names:
                raise SchemaError(f"{path}: missing column '{col}'; a features table needs image_id and embedding.")
        ids = [str(i) for i in t.column("image_id").to_pylist()]
        cats = t.column("category").to_pylist() if "category" in t.schema.names else [""] * len(ids)
        cats = [c or "" for c in cats]
        emb = np.asarray(t.column("embedding").to_pylist(), dtype=np.float32)
    else:
        raise UsageError(f"--from-features {path}: use a .npy (with --ids) or a .parquet file.")
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise DataError(f"{path}: features have shape {emb.shape} but there are {len(ids)} ids; "
                        f"expected one row per id.")
    return ids, cats, emb.astype(np.float32, copy=False)



CLIP_RETRIEVAL_ID_COLUMNS = ("image_id", "key", "image_path", "url")   # the first present names the image


def clip_retrieval_files(folder: Path) -> list[tuple[Path, Path]]:
    """(img_emb_{i}.npy, metadata_{i}.parquet) pairs of a clip-retrieval folder, in numeric order of i.

    Checks before anything is converted: every embedding file has its metadata file and both have
    the same number of rows; one dimension throughout."""
    import pyarrow.parquet as pq

    emb_dir, meta_dir = folder / "img_emb", folder / "metadata"
    num = lambda p: int(re.search(r"_(\d+)$", p.stem).group(1))  # noqa: E731
    embs = sorted((p for p in emb_dir.glob("img_emb_*.npy") if re.search(r"_\d+$", p.stem)), key=num)
    if not embs:
        raise DataError(f"{folder}: not a clip-retrieval embedding folder (no img_emb/img_emb_N.npy files). "
                        f"Pass a .npy with --ids, a .parquet, or a folder with img_emb/ and metadata/.")
    pairs, dim = [], None
    for e in embs:
        m = meta_dir / f"metadata_{num(e)}.parquet"
        if not m.exists():
            raise DataError(f"{m}: file not found; {e.name} needs its row-aligned metadata file.")
        arr = np.load(e, mmap_mode="r", allow_pickle=False)
        rows = pq.read_metadata(m).num_rows
        if arr.ndim != 2 or arr.shape[0] != rows:
            raise DataError(f"{e}: shape {arr.shape} does not match the {rows} rows of {m.name}; "
                            f"the files must be row-aligned.")
        if dim is not None and arr.shape[1] != dim:
            raise DataError(f"{e}: dimension {arr.shape[1]}, but {embs[0].name} has {dim}.")
        dim = arr.shape[1]
        names = pq.read_schema(m).names
        if not any(c in names for c in CLIP_RETRIEVAL_ID_COLUMNS):
            raise SchemaError(f"{m}: no id column; a clip-retrieval metadata file needs one of "
                              f"{', '.join(CLIP_RETRIEVAL_ID_COLUMNS)}.")
        pairs.append((e, m))
    return pairs


def clip_retrieval_parts(pairs: list[tuple[Path, Path]]) -> Iterator[pa.Table]:
    """Gallery tables, one per (embeddings, metadata) pair: ids from the first id column present,
    ``category`` when the metadata has one, float16/float32 embeddings L2-normalized to float32."""
    import pyarrow.parquet as pq

    for e, m in pairs:
        t = pq.read_table(m)
        col = next(c for c in CLIP_RETRIEVAL_ID_COLUMNS if c in t.schema.names)
        ids = [str(i) for i in t.column(col).to_pylist()]
        cats = [c or "" for c in t.column("category").to_pylist()] if "category" in t.schema.names else [""] * len(ids)
        emb = np.asarray(np.load(e, allow_pickle=False), dtype=np.float32)
        _check_rows(emb, ids, e)
        yield gallery_table(ids, cats, [[] for _ in ids], l2_normalize(emb))


def _check_rows(emb: np.ndarray, ids: list, path) -> None:
    norms = np.linalg.norm(emb, axis=1)
    bad = ~np.isfinite(emb).all(axis=1) | (norms < 1e-12)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} feature row(s) are zero, NaN or inf "
                        f"(first: {ids[int(np.flatnonzero(bad)[0])]}). Drop or recompute them.")


def check_encoder_change(ws: Workspace, encoder_name: str) -> None:
    """Refuse features from another encoder than the one the workspace's triplets were embedded with
    (their text embeddings would be compared with image features of another space)."""
    old = ((ws.manifest().get("encoder") or {}).get("name") or "unknown") if ws.manifest_path.exists() else "unknown"
    triplets = sorted(p.name for p in ws.root.glob("triplets.*.parquet"))
    if triplets and old != "unknown" and encoder_name != old:
        raise DataError(
            f"{ws.root}: {', '.join(triplets)} hold text embeddings from encoder '{old}', but these features come "
            f"from '{encoder_name}'. Pass --encoder-name {old} if the features come from it, or "
            f"--allow-encoder-change to import them anyway (then re-embed the triplets).")


def carry_over(ws: Workspace, split: str, ids: list, cats: list) -> tuple[list, list, Optional[list], Optional[list]]:
    """Categories, attributes, paths and attribute scores of the split's current gallery (a file or a
    parts folder), for the imported ids it holds (matched by (category, id), or by id alone where the
    features give no category). Returns (categories, attributes, paths or None, attribute_scores or None)."""
    from cir_mine.data.workspace import read_gallery

    p = ws.gallery_path(split)
    empty = [[] for _ in ids]
    if not p.exists():
        return cats, empty, None, None
    old = read_gallery(p, check_norm=False)
    rows = [old.key_row.get((c, i)) if c else old.row_of.get(i) for i, c in zip(ids, cats)]
    if all(r is None for r in rows):
        return cats, empty, None, None
    cats = [c or (old.categories[r] if r is not None else "") for c, r in zip(cats, rows)]
    attrs = [list(old.attributes[r]) if r is not None else [] for r in rows]
    paths = [old.paths[r] or "" if r is not None else "" for r in rows] if old.paths is not None else None
    scores = None
    given = [read_parquet(f, columns=["attribute_scores"]) for f in ws.gallery_files(split)]
    if given[0].num_columns:
        col = [v for t in given for v in t.column(0).to_pylist()]
        scores = [list(col[r] or []) if r is not None else [] for r in rows]
    return cats, attrs, paths, scores


def import_features(work: str | Path, split: str, path: str | Path, ids_path: Optional[str | Path] = None,
                    encoder_name: str = "unknown", index: str = "flat", device: str = "auto",
                    fp16: bool = False, allow_encoder_change: bool = False, overwrite: bool = True) -> dict:
    """Write ``gallery.{split}.parquet`` from precomputed features (L2-normalized here), then the index;
    a clip-retrieval folder becomes the parts folder ``gallery.{split}/``.

    The split's current gallery lends its categories, attributes (tags), paths and attribute scores
    to the ids it shares with the features (.npy and .parquet). Features from another encoder than
    the workspace's triplets are refused unless ``allow_encoder_change``. Everything is validated
    before anything is replaced: the features (finite, non-zero, one id per row, no duplicated id
    within a category, the workspace's dimension) and the spec of the index; the features file is
    never one of the files it replaces. All or nothing (the gallery, index and manifest appear together).
    """
    check_split(split)
    ws = Workspace(work)
    if Path(path).is_dir():
        pairs = clip_retrieval_files(Path(path))
        dim = int(np.load(pairs[0][0], mmap_mode="r").shape[1])
        if not allow_encoder_change:
            check_encoder_change(ws, encoder_name)
        ws.check_new_split(split, None, overwrite)
        _check_feature_dim(ws, split, path, dim)
        with write_job(ws.root, "cir-mine index --from-features"):
            ws.write_gallery(split, clip_retrieval_parts(pairs), metadata={"features": str(path), "layout": "clip-retrieval"})
            meta = (index_workspace(ws.root, split, index, device=device, fp16=fp16, lock=False)
                    if index != "none" else None)
            ws.write_manifest(source="features", encoder={"name": encoder_name, "dim": dim})
            return meta or {}
    for p in (path, ids_path):
        if p is not None:
            check_readable_file(Path(p))
            for target in (ws.gallery_path(split), ws.manifest_path, ws.index_path(split)):
                if same_file(p, target):
                    raise UsageError(f"{p}: is the file this command replaces ({target}). Copy it elsewhere "
                                     f"and import the copy.")
    ids, cats, emb = read_features(path, ids_path)
    seen: set = set()
    for key in zip(cats, ids):
        if key in seen:
            where = f" in category '{key[0]}'" if key[0] else ""
            raise DataError(f"{ids_path or path}: image id '{key[1]}' appears twice{where}. Each image needs "
                            f"one feature row; drop the duplicates.")
        seen.add(key)
    _check_rows(emb, ids, path)
    _check_feature_dim(ws, split, path, int(emb.shape[1]))
    if not allow_encoder_change:
        check_encoder_change(ws, encoder_name)
    ws.check_new_split(split, None, overwrite)
    if index != "none":
        check_index_spec(index, len(ids), int(emb.shape[1]))
    with write_job(ws.root, "cir-mine index --from-features"):
        cats, attrs, paths, scores = carry_over(ws, split, ids, cats)
        table = gallery_table(ids, cats, attrs, l2_normalize(emb), paths=paths)
        if scores is not None:
            table = table.append_column(pa.field("attribute_scores", pa.list_(pa.float32())),
                                        pa.array(scores, pa.list_(pa.float32())))
        ws.write_gallery(split, table, metadata={"features": str(path)})
        meta = (index_workspace(ws.root, split, index, device=device, fp16=fp16, lock=False)
                if index != "none" else None)
        ws.write_manifest(source="features", encoder={"name": encoder_name, "dim": int(emb.shape[1])})
        return meta or {}


def _check_feature_dim(ws: Workspace, split: str, path, dim: int) -> None:
    """The features' dimension must be the workspace's (its other tables, this split's triplets)."""
    import pyarrow.parquet as pq

    if not ws.root.is_dir():
        return
    tables = [p for p in sorted(ws.root.glob("*.*.parquet"))
              if p.name.startswith(("gallery.", "triplets.")) and p != ws.gallery_path(split)]
    for p in tables:
        col = "embedding" if p.name.startswith("gallery.") else "text_embedding"
        try:
            t = pq.read_schema(p).field(col).type
        except (KeyError, pa.ArrowInvalid, OSError):
            continue
        if pa.types.is_fixed_size_list(t) and t.list_size != dim:
            raise DataError(f"{path}: features have d={dim} but {p} has d={t.list_size}. Import features of the "
                            f"workspace's encoder, or use another --work.")

