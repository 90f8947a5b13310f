"""Compact gallery metadata (cir_mine.data.rows): the Arrow/numpy forms answer exactly as the Python
lists and dicts they replace."""

import pickle

import numpy as np
import pyarrow as pa
from hypothesis import given, settings, strategies as st

from cir_mine.data.memory import fast_pool
from cir_mine.data.rows import AttrLists, first_duplicate, gather, shared_objects, sorted_codes
from cir_mine.data.workspace import Gallery, read_gallery
from cir_mine.miner.core.attribute_codes import AttrCodes
from cir_mine.miner.core.search.persist import gallery_fingerprint

tags = st.lists(st.sampled_from(["color:red", "color:blue", "sleeve:short", "neck:v", "fit:slim"]), max_size=4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(tags, st.none()), max_size=30))
def test_attr_lists_read_as_the_lists(lists):
    want = [list(a or []) for a in lists]
    a = AttrLists.from_lists(lists)
    assert len(a) == len(want) and list(a) == want and a == want
    assert [a[i] for i in range(len(want))] == want and a[1:4] == want[1:4]
    if want:
        assert a[-1] == want[-1]
    assert pickle.loads(pickle.dumps(a)) == a
    # the vectorized combinations are the per-row loop's: same ids in the same order
    of: dict = {}
    combo = [of.setdefault(tuple(sorted(x)), len(of)) for x in want]
    got, combos = a.combos()
    assert got.tolist() == combo and combos == list(of)


def test_gather_is_take_on_the_fast_pool():
    values = pa.chunked_array([["a", "bb", None], ["dddd", "e"]])
    idx = np.array([4, 0, 2, 3, 3, 1], np.int64)
    before = fast_pool().bytes_allocated()
    out = gather(values, idx)
    assert out.equals(values.take(pa.array(idx)))
    assert fast_pool().bytes_allocated() > before  # its buffers, held by out
    assert gather(pa.array(["x", "y"]), pa.array([1, 1, 0])).to_pylist() == ["y", "y", "x"]
    assert gather(pa.array(["x"]), np.zeros(0, np.int64)).to_pylist() == []


def test_attr_codes_same_from_lists_and_attr_lists():
    lists = [["color:red", "sleeve:short"], [], ["sleeve:short", "color:red"], ["neck:v"], []] * 3
    a, b = AttrCodes.build(lists, []), AttrCodes.build(AttrLists.from_lists(lists), [])
    assert a.combo.tolist() == b.combo.tolist() and np.array_equal(a.bits, b.bits)
    assert a.groups == b.groups and np.array_equal(a.group_code, b.group_code)


def test_shared_objects_share_one_string_per_value():
    out = shared_objects(pa.chunked_array([["dress", "shirt"], ["dress", None]]))
    assert out.tolist() == ["dress", "shirt", "dress", None] and out[0] is out[2]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="abcé-_0", max_size=4), max_size=30))
def test_sorted_codes_are_numpy_unique(values):
    codes, uniq = sorted_codes(pa.array(values, pa.string()))
    u, inv = np.unique(np.array(values, dtype=str), return_inverse=True) if values else (np.array([]), np.array([]))
    assert uniq == u.tolist() and codes.tolist() == inv.ravel().tolist()
    dup = first_duplicate(pa.array(values, pa.string()))
    seen, first = set(), None
    for i, v in enumerate(values):
        if v in seen:
            first = i
            break
        seen.add(v)
    assert dup == first


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["dress", "shirt", ""]), st.sampled_from("abcde")), max_size=12, unique=True),
    st.lists(st.tuples(st.sampled_from(["dress", "shirt", "", "toptee"]), st.sampled_from("abcdefz")), max_size=12),
)
def test_lookup_is_the_dicts(gallery, probes):
    cats = np.array([c for c, _ in gallery], dtype=object)
    ids = np.array([i for _, i in gallery], dtype=object)
    g = Gallery("g", ids, cats, [[] for _ in gallery], np.zeros((len(gallery), 2), np.float32))
    pc, pi = [c for c, _ in probes], [i for _, i in probes]
    by_key = [g.key_row.get((c, i), g.row_of.get(i, -1)) for c, i in probes]
    by_id = [g.row_of.get(i, -1) for i in pi]
    assert g.lookup(pi, pc).tolist() == by_key and g.lookup(pi).tolist() == by_id


def test_fingerprint_is_the_per_row_formula():
    """The hash workspaces already record: SHA-256 over "{category}\\0{id}\\0" per row, then the bytes."""
    import hashlib

    ids, cats = np.array(["a", "bé", "c"], object), np.array(["x", "", "x"], object)
    emb = np.arange(6, dtype=np.float32).reshape(3, 2)
    h = hashlib.sha256("".join(f"{c}\0{i}\0" for c, i in zip(cats, ids)).encode() + emb.tobytes())
    assert gallery_fingerprint(ids, cats, emb) == h.hexdigest()[:16]
    assert gallery_fingerprint(pa.array(ids.tolist()), pa.array(cats.tolist()), emb, block_rows=2) == h.hexdigest()[:16]


def test_a_read_gallery_holds_compact_metadata(tmp_path):
    from cir_mine.data.workspace import gallery_table, write_table

    emb = np.eye(3, dtype=np.float32)
    write_table(
        gallery_table(["a", "b", "c"], ["dress", "dress", "shirt"], [["color:red"], [], ["color:red"]], emb),
        tmp_path / "g.parquet",
    )
    g = read_gallery(tmp_path / "g.parquet")
    assert isinstance(g.attributes, AttrLists) and g.attributes == [["color:red"], [], ["color:red"]]
    assert g.categories[0] is g.categories[1] and g.rows(["c", "a"], ["shirt", "dress"]).tolist() == [2, 0]
