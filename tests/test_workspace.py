import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cir_mine.data.errors import DataError, SchemaError
from cir_mine.data.workspace import Workspace, gallery_table, l2_normalize, read_gallery, triplets_table, write_table


def _gallery(tmp_path, emb=None, ids=None, cats=None):
    rng = np.random.default_rng(0)
    emb = l2_normalize(rng.standard_normal((4, 8)).astype(np.float32)) if emb is None else emb
    ids = ids or ["a", "b", "c", "d"]
    cats = cats or ["dress"] * len(ids)
    t = gallery_table(ids, cats, [["color:red"], [], ["tag:x"], []], emb)
    p = tmp_path / "gallery.train.parquet"
    write_table(t, p)
    return p


def test_roundtrip_and_derived_manifest(tmp_path):
    p = _gallery(tmp_path)
    g = read_gallery(p)
    assert g.image_ids.tolist() == ["a", "b", "c", "d"] and g.dim == 8
    assert g.attributes[0] == ["color:red"]
    rng = np.random.default_rng(1)
    te = l2_normalize(rng.standard_normal((2, 8)).astype(np.float32))
    write_table(
        triplets_table(["q0", "q1"], ["dress"] * 2, ["a", "b"], ["b", "c"], [["is red"], ["is blue", ""]], te),
        tmp_path / "triplets.train.parquet",
    )
    ws = Workspace(tmp_path)
    m = ws.manifest()
    assert m["derived"] and m["dim"] == 8 and m["counts"] == {"gallery.train": 4, "triplets.train": 2}
    g, t = ws.load("train")
    assert t.target_ids.tolist() == ["b", "c"] and np.allclose(t.text_embeddings, te)
    h = ws.manifest_hash()
    ws.write_manifest(source="test")
    assert ws.manifest_hash() != h and json.loads(ws.manifest_path.read_text())["source"] == "test"


def test_missing_column(tmp_path):
    p = tmp_path / "gallery.train.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "category": ["x"]}), p)
    with pytest.raises(SchemaError) as e:
        read_gallery(p)
    assert str(e.value) == (
        f"{p}: missing column 'attributes' (list<string>); a gallery table needs the "
        f"columns image_id, category, attributes, embedding. See docs/formats.md."
    )


def test_wrong_dtype(tmp_path):
    p = tmp_path / "gallery.train.parquet"
    pq.write_table(
        pa.table({"image_id": ["a"], "category": ["x"], "attributes": [["t"]], "embedding": [[1.0, 0.0]]}), p
    )
    with pytest.raises(
        SchemaError, match=r"column 'embedding' has type list<element: double>, expected fixed_size_list<float32>\[d\]"
    ):
        read_gallery(p)


def test_nan_and_unnormalized(tmp_path):
    emb = np.eye(4, 8, dtype=np.float32)
    emb[2, 0] = np.nan
    with pytest.raises(SchemaError, match=r"column 'embedding' has 1 row\(s\) with NaN or inf values \(first: c\)"):
        read_gallery(_gallery(tmp_path, emb))
    emb = np.eye(4, 8, dtype=np.float32) * 2
    with pytest.raises(SchemaError, match=r"not L2-normalized \(first: a with norm 2.0000\)"):
        read_gallery(_gallery(tmp_path, emb))


def test_duplicate_ids_within_category(tmp_path):
    with pytest.raises(SchemaError, match="duplicated id 'a' in category 'dress'"):
        read_gallery(_gallery(tmp_path, ids=["a", "b", "a", "d"]))
    # the same id in two categories is one product listed twice (as in real FashionIQ): allowed
    g = read_gallery(_gallery(tmp_path, ids=["a", "b", "a", "d"], cats=["shirt", "shirt", "toptee", "toptee"]))
    assert g.rows(["a", "a"], ["shirt", "toptee"]).tolist() == [0, 2]


def test_dimension_mismatch(tmp_path):
    _gallery(tmp_path)
    te = l2_normalize(np.ones((1, 6), np.float32))
    write_table(triplets_table(["q"], ["dress"], ["a"], ["b"], [["x"]], te), tmp_path / "triplets.train.parquet")
    with pytest.raises(SchemaError, match="has dimension 6 but the gallery has dimension 8"):
        Workspace(tmp_path).load("train")


def test_missing_reference(tmp_path):
    _gallery(tmp_path)
    te = l2_normalize(np.ones((1, 8), np.float32))
    write_table(triplets_table(["q"], ["dress"], ["zz"], ["b"], [["x"]], te), tmp_path / "triplets.train.parquet")
    with pytest.raises(
        DataError, match="column 'ref_id' names 1 image\\(s\\) missing from .* \\(first: zz, query q\\)"
    ):
        Workspace(tmp_path).load("train")


def test_missing_split_names_the_splits(tmp_path):
    _gallery(tmp_path)
    with pytest.raises(DataError, match="splits in .*: train. Pass one with `split`") as e:
        Workspace(tmp_path).gallery("val")
    assert e.value.render(lambda p: "--" + p).endswith("splits in " + str(tmp_path) + ": train. Pass one with --split.")


def test_not_parquet(tmp_path):
    p = tmp_path / "gallery.train.parquet"
    p.write_bytes(b"garbage")
    with pytest.raises(SchemaError, match="not a readable Parquet file"):
        read_gallery(p)


def test_fiq_proxy_loads_unchanged(fiq_proxy):
    root = fiq_proxy
    ws = Workspace(root)
    g, t = ws.load("train")
    assert (len(g), len(t)) == (29728, 8847)
    assert g.dim == t.dim == 384 == ws.manifest()["dim"]
    assert ws.manifest()["derived"] is True
    assert t.query_ids[0] == "dress-train-00000"
    assert all(":" in a for a in g.attributes[0])
    # the same ASIN listed under shirt and toptee resolves within the triplet's category
    rows = g.rows(t.ref_ids, t.categories)
    assert (g.categories[rows] == t.categories).all()


def test_array_bytes_are_the_bytes_tobytes_gives(tmp_path):
    """Hashes read arrays through a view: the same bytes as ``tobytes`` for empty, float16,
    strided and memory-mapped arrays, so fingerprints of saved indexes keep their value."""
    import hashlib

    import numpy as np

    from cir_mine.data.embeddings import array_bytes

    mm = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float32, shape=(5, 3))
    mm[:] = np.arange(15, dtype=np.float32).reshape(5, 3)
    cases = [
        np.zeros((0, 4), np.float32),
        np.arange(12, dtype=np.float16).reshape(3, 4),
        np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],
        mm[1:4],
    ]
    for a in cases:
        assert hashlib.sha256(array_bytes(a)).digest() == hashlib.sha256(a.tobytes()).digest()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_rows_are_named_in_any_float_dtype(bad, dtype):
    """The finiteness check reads each row's norm: an inf, -inf or NaN value makes it non-finite,
    while a huge finite value (its square summed in float64) is reported as not normalized."""
    from cir_mine.data.embeddings import check_embeddings

    emb = np.eye(4, 8, dtype=dtype)
    emb[1, 3] = bad
    with pytest.raises(SchemaError, match=r"1 row\(s\) with NaN or inf values \(first: b\)"):
        check_embeddings(emb, Path("g.parquet"), "embedding", ["a", "b", "c", "d"])
    emb = np.eye(4, 8, dtype=dtype)
    emb[2, 0] = np.finfo(dtype).max
    with pytest.raises(SchemaError, match=r"1 row\(s\) that are not L2-normalized \(first: c"):
        check_embeddings(emb, Path("g.parquet"), "embedding", ["a", "b", "c", "d"])


@pytest.mark.parametrize("cores", [1, 2, 3])
def test_gallery_embeddings_are_read_by_row_group_into_an_array_numpy_owns(tmp_path, monkeypatch, cores):
    """The embedding column is copied, row group by row group (on one thread per core), into one
    float32 array owned by numpy (its allocator asks for huge pages, which the candidate gathers run
    faster on), equal to the column whatever the number of threads."""
    import cir_mine.data.embeddings as embeddings

    monkeypatch.setattr(embeddings, "usable_cores", lambda: cores)
    rng = np.random.default_rng(3)
    emb = l2_normalize(rng.standard_normal((10, 8)).astype(np.float32))
    t = gallery_table([f"i{i}" for i in range(10)], ["dress"] * 10, [[] for _ in range(10)], emb)
    p = tmp_path / "g.parquet"
    pq.write_table(t, p, row_group_size=3)
    assert pq.ParquetFile(p).num_row_groups == 4
    g = read_gallery(p)
    assert g.embeddings.dtype == np.float32 and g.embeddings.flags.c_contiguous
    assert g.embeddings.base is None and g.embeddings.flags.owndata
    assert np.array_equal(g.embeddings, emb)


def test_a_null_embedding_row_is_named(tmp_path):
    t = pq.read_table(_gallery(tmp_path))
    col = t.column("embedding").combine_chunks()
    holed = pa.FixedSizeListArray.from_arrays(col.values, 8, mask=pa.array([False, True, False, False]))
    p = tmp_path / "holed.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("embedding"), "embedding", holed), p)
    with pytest.raises(SchemaError, match=r"holed\.parquet: column 'embedding' has null rows\."):
        read_gallery(p)
