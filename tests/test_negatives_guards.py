"""False-negative guards: unit tests per guard and property tests that no guard is ever violated."""

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from cir_mine.miner.core import attributes as A
from cir_mine.miner.core.attribute_codes import AttrCodes
from cir_mine.miner.core.guards import (
    GuardConfig,
    PairSet,
    apply_guards,
    member,
    cap_guard,
    duplicate_product_guard,
    extra_positive_guard,
    near_duplicate_guard,
    pair_keys,
    reference_guard,
    target_guard,
)
from cir_mine.miner.core.mine import MineConfig, mine_negatives
from tests.builders import by_query, search_options
from tests.fixtures import tiny_workspace


def test_each_guard_mask_and_count():
    prod = np.array([[0, 1, 2, 3], [3, 3, 1, 0]])
    m, n = target_guard(prod, np.array([1, 3]))
    assert m.tolist() == [[False, True, False, False], [True, True, False, False]] and n.tolist() == [1, 2]
    m, n = reference_guard(prod, np.array([0, 0]))
    assert n.tolist() == [1, 1]
    m, n = extra_positive_guard(prod, np.array([0, 1]), PairSet(np.array([0, 1]), np.array([2, 1]), 2, 10))
    assert m.tolist() == [[False, False, True, False], [False, False, True, False]]
    m, n = near_duplicate_guard(np.array([[0.99, 0.5]]), 0.98)
    assert m.tolist() == [[True, False]] and n.tolist() == [1]
    assert near_duplicate_guard(np.array([[0.99]]), None)[1].tolist() == [0]
    m, n = cap_guard(np.array([[0.5, 0.46, 0.4], [-0.5, -0.52, -0.6]]), np.array([0.5, -0.5]), 0.9)
    assert m.tolist() == [[True, True, False], [True, True, False]]
    m, n = duplicate_product_guard(np.array([[5, 2, 5, 5, 1]]), np.array([[True, True, False, True, True]]))
    assert m.tolist() == [[False, False, False, True, False]] and n.tolist() == [1]


def test_apply_guards_counts_each_removal_once_and_trusts_verified():
    rows = np.array([[0, 1, 2, 3, -1]])
    prod = np.array([[0, 1, 2, 3, -1]])
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0]], np.float32)
    sim = lambda need: np.array([[1.0, 0.1, 0.99, 0.2, 0]], np.float32)
    ver = PairSet(np.array([0]), np.array([2]), 1, 10)
    none = PairSet(np.zeros(0, np.int64), np.zeros(0, np.int64), 1, 10)
    valid, counts = apply_guards(
        rows,
        prod,
        scores,
        sim,
        np.array([0.9], np.float32),
        np.array([0]),
        np.array([3]),
        np.array([0]),
        none,
        ver,
        GuardConfig(),
    )
    assert valid.tolist() == [[False, True, True, False, False]]  # 2 is verified: near-dup skipped
    assert counts["target"].tolist() == [1] and counts["cap"].tolist() == [0]
    assert counts["reference"].tolist() == [1] and counts["near_duplicate"].tolist() == [0]
    valid, counts = apply_guards(
        rows,
        prod,
        scores,
        sim,
        np.array([0.9], np.float32),
        np.array([0]),
        np.array([3]),
        np.array([0]),
        none,
        ver,
        GuardConfig(trust_verified=False, rho=None),
    )
    assert valid.tolist() == [[False, True, False, False, False]] and counts["near_duplicate"].tolist() == [1]


def test_pair_set_lookup_equals_the_sorted_key_search():
    """Dense (few pairs per query) and sparse (many) lookups answer as the sorted-key search does."""
    rng = np.random.default_rng(3)
    for per_query in (3, 40, "varied"):
        m, n_products = 50, 500
        counts = rng.integers(0, 20, m) if per_query == "varied" else np.full(m, per_query)
        q = np.repeat(np.arange(m), counts)  # varied: most queries hold few, some none
        prod = rng.integers(0, n_products, q.size)
        ps = PairSet(q, prod, m, n_products)
        assert (ps.dense is not None) == (counts.max() <= PairSet.MAX_DENSE)
        qb = rng.integers(0, m, 30)
        cand = rng.integers(-1, n_products, (30, 60))  # -1: empty slots
        ref = member(pair_keys(qb, cand, n_products), np.unique(pair_keys(q[:, None], prod[:, None], n_products)))
        ref &= cand >= 0
        assert ref.any() and np.array_equal(ps.contains(qb, cand), ref)
    # an empty slot (-1) of query 1 is not query 0's last product, in either form
    for per_query in (3, 40):
        ps = PairSet(np.zeros(per_query, np.int64), np.arange(500 - per_query, 500), 2, 500)
        assert not ps.contains(np.array([1]), np.array([[-1]])).any()


def _world(rng, n, d, n_q, twin_ids, dup_targets):
    emb = rng.standard_normal((n, d)).astype(np.float32)
    cats = ["dress" if i % 2 else "shirt" for i in range(n)]
    ids = [f"i{i}" for i in range(n)]
    for j in range(twin_ids):  # same id under the other category: one product
        ids[2 * j + 1] = ids[2 * j]
        emb[2 * j + 1] = emb[2 * j]  # the same product image
    queries = []
    for qi in range(n_q):
        ref, tgt = rng.choice(n, 2, replace=False)
        while ids[ref] == ids[tgt]:  # a twin of the target is the target: no query
            ref, tgt = rng.choice(n, 2, replace=False)
        if dup_targets and qi % 2 == 0:  # a near-duplicate of the target elsewhere
            other = int(rng.integers(2 * twin_ids, n))
            emb[other] = emb[tgt] + 0.01 * rng.standard_normal(d)
        extra = [ids[int(x)] for x in rng.choice(n, 3, replace=False)]
        queries.append(
            {
                "ref": ids[ref],
                "target": ids[tgt],
                "category": cats[tgt],
                "text": rng.standard_normal(d).astype(np.float32),
                "extra": extra,
            }
        )
    attrs = [[f"color:{['red', 'blue'][i % 2]}"] for i in range(n)]
    return emb, ids, cats, attrs, queries


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(12, 60),
    k=st.integers(1, 10),
    twins=st.integers(0, 4),
    strategy=st.sampled_from(
        [
            "hardest",
            "semihard",
            "midzone",
            "random",
            "category",
            "soft",
            "semantic",
            "category-discrepant",
            "attribute-mismatch",
            "midzone:0.5,random:0.5",
        ]
    ),
    rho=st.sampled_from([None, 0.5, 0.95, 1.0]),
    dup=st.sampled_from([None, 0.9, 0.98]),
    text_weight=st.sampled_from([0.0, 1.0, 3.0]),
    batch=st.integers(1, 9),
    index=st.sampled_from(["flat", "torch-fp32", "torch-bf16", "IVF4,Flat", "HNSW8,Flat", "IVF4,PQ4x2"]),
)
def test_no_guard_is_ever_violated(seed, n, k, twins, strategy, rho, dup, text_weight, batch, index):
    rng = np.random.default_rng(seed)
    emb, ids, cats, attrs, queries = _world(rng, n, 8, 6, twins, dup is not None)
    if len(set(zip(cats, ids))) != n:
        return
    cfg_options, call_options = search_options(index)
    with tempfile.TemporaryDirectory() as tmp:
        ws = tiny_workspace(Path(tmp), emb, ids, cats, attrs, queries)
        cfg = MineConfig.of(
            mix=strategy,
            k=k,
            seed=seed,
            rho=rho,
            dup_threshold=dup,
            text_weight=text_weight,
            delta_lo=-2.0,
            delta_hi=2.0,
            margin=2.0,
            candidates=n,
            query_batch=batch,
            **cfg_options,
        )
        res = mine_negatives(ws, "train", cfg, **call_options)
        g, t = ws.load("train")
    x = dict(zip(g.image_ids.tolist(), g.embeddings))
    for qid, rows in by_query(res.table).items():
        qi = t.query_ids.tolist().index(qid)
        assert len(rows) <= k and len({r["neg_id"] for r in rows}) == len(rows)
        for r in rows:
            assert r["neg_id"] not in (t.target_ids[qi], t.ref_ids[qi])
            assert r["neg_id"] not in t.extra_positive_ids[qi]
            if dup is not None:
                assert float(x[r["neg_id"]] @ x[t.target_ids[qi]]) < dup
            if rho is not None:
                ts = r["target_score"]
                assert r["score"] <= ts - (1 - rho) * abs(ts) + 1e-5
    assert res.meta["shortfall"]["count"] == sum(
        1 for q in t.query_ids.tolist() if len(by_query(res.table).get(q, [])) < res.meta["k_mined"]
    )


def test_verified_negatives(tmp_path):
    rng = np.random.default_rng(0)
    emb, ids, cats, attrs, queries = _world(rng, 30, 8, 4, 0, False)
    queries[0]["verified"] = ["i5", "i7", "i9"]
    queries[1]["verified"] = ["i3", queries[1]["target"]]  # a bad annotation: the target is never returned
    queries[2]["verified"] = ["i11", "i13", "i15", "i17"]
    ws = tiny_workspace(tmp_path / "w", emb, ids, cats, attrs, queries)
    res = mine_negatives(ws, "train", MineConfig.of(strategy="verified", k=3, rho=0.0001))
    got = {q: [r["neg_id"] for r in rows] for q, rows in by_query(res.table).items()}
    assert got["q000"] == ["i5", "i7", "i9"]  # the cap does not apply to verified negatives
    assert got["q001"] == ["i3"] and got["q002"] == ["i11", "i13", "i15"] and "q003" not in got
    assert res.meta["shortfall"]["query_ids"] == ["q001", "q003"]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_attrmatrix_matches_attributes_api(seed):
    """The vectorized status tables give exactly requested_status's answers (with the reference)."""
    rng = np.random.default_rng(seed)
    vocab = {
        "color": ["red", "blue", "black", "white"],
        "sleeve": ["short", "long", "sleeveless"],
        "pattern": ["striped", "floral", "solid"],
        "length": ["mini", "midi", "maxi"],
        "part": ["sleeveless", "v-neck", "long-sleeve"],
        "texture": ["striped", "floral", "print"],
        "fabric": ["chiffon", "cotton"],
    }
    gal = [[f"{g}:{rng.choice(v)}" for g, v in vocab.items() if rng.random() < 0.5] for _ in range(25)]
    gal += [["cotton", "casual"], []]
    caps = [
        "is red",
        "has long sleeves",
        "is blue and striped",
        "has longer sleeves",
        "is floral and black",
        "no sleeves",
        "is shorter",
        "is white with short sleeves",
        "is not striped",
        "is longer and darker",
        "is a chiffon maxi dress",
        "has a v-neck",
    ]
    reqs = [A.extract(str(rng.choice(caps))) for _ in range(8)]
    refs = rng.integers(0, len(gal), len(reqs))
    codes = AttrCodes.build(gal, reqs, refs)
    q = np.arange(len(reqs))
    rows = rng.integers(0, len(gal), (len(reqs), 12))
    st_ = codes.status(q, rows)
    for i in range(len(reqs)):
        for j in range(12):
            ref = A.requested_status(gal[rows[i, j]], reqs[i], ref_attrs=gal[refs[i]])
            for gi, g in enumerate(codes.req_groups):
                want = ref.get(g, "absent")
                got = {1: True, 0: False, -1: None, -2: "absent"}[int(st_[i, j, gi])]
                assert got == want, (gal[rows[i, j]], reqs[i], g)
    a, b = rng.integers(0, len(gal), 50), rng.integers(0, len(gal), 50)
    ov = codes.overlap(a, b)
    assert np.allclose(ov, [A.attr_overlap(gal[x], gal[y]) for x, y in zip(a, b)])
