"""kept-mismatch and error-targeted on the synthetic world: their defining properties, the top-1
error measurement against a brute-force version, and the allocation in the footer and metrics.jsonl."""

import json

import numpy as np
import pytest

from cir_mine.data.workspace import Workspace
from cir_mine.miner.core import attributes as A
from cir_mine.miner.core.mine import MineConfig, mine_negatives, mine_to_file
from cir_mine.miner.core.scores import zero_shot_queries
from cir_mine.miner.core.strategies import split_k
from cir_mine.miner.core.tables import read_negatives
from tests.builders import by_query


@pytest.fixture(scope="module")
def world(synth_work):
    ws = Workspace(synth_work)
    g, t = ws.load("train")
    return {
        "ws": ws,
        "g": g,
        "t": t,
        "attrs": dict(zip(g.image_ids.tolist(), g.attributes)),
        "req": {q: A.extract(" and ".join(c)) for q, c in zip(t.query_ids.tolist(), t.captions)},
        "ref": dict(zip(t.query_ids.tolist(), t.ref_ids.tolist())),
    }


def mine(world, query_emb=None, **kw):
    kw = {"k": 10, "candidates": 300, "device": "cpu", **kw}
    return mine_negatives(world["ws"], "train", MineConfig.of(**kw), query_emb=query_emb)


def differing_groups(a, b) -> set:
    ga, gb = A.group_values(a), A.group_values(b)
    return {g for g in set(ga) | set(gb) if ga.get(g) != gb.get(g)}


def test_kept_mismatch_satisfies_the_change_and_breaks_what_should_be_kept(world):
    res = mine(world, strategy="kept-mismatch")
    assert res.table.num_rows > 1000
    for r in res.table.to_pylist():
        req = world["req"][r["query_id"]]
        st = A.requested_status(world["attrs"][r["neg_id"]], req, ref_attrs=world["attrs"][world["ref"][r["query_id"]]])
        assert False not in st.values() and (True in st.values() or not req.groups), (st, req)
        kept_diff = differing_groups(world["attrs"][r["neg_id"]], world["attrs"][r["target_id"]]) - set(req.groups)
        assert kept_diff, (r, req.groups)
    # the complement: attribute-mismatch rows (a requested group contradicted) are never kept-mismatch rows
    am = {
        (r["query_id"], r["neg_id"])
        for r in mine(world, strategy="attribute-mismatch", mismatch_kept_share=0.0).table.to_pylist()
    }
    km = {(r["query_id"], r["neg_id"]) for r in res.table.to_pylist()}
    assert am and not (am & km)


def brute_top1_errors(world, q) -> dict:
    """Per group error mass of the top-1 in the target's category (full argmax, no index)."""
    g, t = world["g"], world["t"]
    cats = np.asarray(g.categories)
    tgt = g.rows(t.target_ids.tolist(), t.categories.tolist(), "target")
    extra = [set(x) for x in t.extra_positive_ids]
    mass: dict = {}
    for i in range(len(t)):
        rows = np.flatnonzero(cats == cats[tgt[i]])
        top = rows[np.argmax(g.embeddings[rows] @ q[i])]
        a, b = g.attributes[top], g.attributes[tgt[i]]
        diff = differing_groups(a, b)
        if top == tgt[i] or g.image_ids[top] in extra[i] or not diff:
            continue
        for grp in diff:
            mass[grp] = mass.get(grp, 0.0) + 1.0 / len(diff)
    return mass


@pytest.mark.parametrize("queries", ["zero-shot", "reference"])
def test_top1_error_measurement_equals_brute_force(world, queries):
    g, t = world["g"], world["t"]
    ref = g.embeddings[g.rows(t.ref_ids.tolist(), t.categories.tolist(), "reference")]
    q = zero_shot_queries(ref, t.text_embeddings) if queries == "zero-shot" else ref
    res = mine(world, query_emb=q, strategy="error-targeted")
    alloc = res.meta["prepared"]["error-targeted"]
    want = brute_top1_errors(world, q)
    assert alloc["top1_other_category"] == 0 and alloc["n_queries"] == len(t)
    assert set(alloc["errors"]) == set(want)
    assert all(abs(alloc["errors"][k] - want[k]) < 1e-2 for k in want)
    assert abs(sum(alloc["shares"].values()) - 1) < 1e-3 and sum(alloc["k"].values()) == 10
    if queries == "reference":
        # the reference ranks itself first: its errors are the groups the caption changes, never a
        # group it keeps (up to the targets' unmentioned changes)
        assert alloc["top1_right"] == 0


def test_error_targeted_gives_each_group_its_share(world):
    res = mine(world, strategy="error-targeted")
    alloc = res.meta["prepared"]["error-targeted"]
    groups = sorted(alloc["errors"])
    ks = dict(zip(groups, split_k(10, [alloc["errors"][g] / sum(alloc["errors"].values()) for g in groups])))
    assert {g: k for g, k in ks.items() if k} == alloc["k"]
    rows = by_query(res.table)
    short = set(res.shortfall)
    full = [q for q in rows if q not in short]
    assert len(full) > len(rows) // 2
    for qid in full:
        diffs = [differing_groups(world["attrs"][r["neg_id"]], world["attrs"][r["target_id"]]) for r in rows[qid]]
        for grp, k in alloc["k"].items():
            assert sum(grp in d for d in diffs) >= k, (qid, grp, diffs)


def test_error_targeted_minimal_pairs_differ_in_one_group(world):
    """error_minimal: every negative differs from the target in exactly one group, one the
    allocation gives slots to."""
    res = mine(world, strategy="error-targeted", error_minimal=True, candidates=1000)
    alloc = res.meta["prepared"]["error-targeted"]
    assert res.table.num_rows > 500
    for r in res.table.to_pylist():
        diff = differing_groups(world["attrs"][r["neg_id"]], world["attrs"][r["target_id"]])
        assert len(diff) == 1 and diff <= set(alloc["k"]), (r, diff)
    # without it, the same allocation also picks negatives that differ in more groups
    loose = mine(world, strategy="error-targeted", candidates=1000).table.to_pylist()
    assert any(len(differing_groups(world["attrs"][r["neg_id"]], world["attrs"][r["target_id"]])) > 1 for r in loose)


def test_error_targeted_without_errors_is_the_ranking(world):
    """Queries that find their target first leave no error: the picks are the ranking's top (hardest)."""
    g, t = world["g"], world["t"]
    q = g.embeddings[g.rows(t.target_ids.tolist(), t.categories.tolist(), "target")]
    res = mine(world, query_emb=q, strategy="error-targeted")
    assert res.meta["prepared"]["error-targeted"]["errors"] == {}
    hardest = mine(world, query_emb=q, strategy="hardest")
    assert res.table.column("neg_id").equals(hardest.table.column("neg_id"))


def test_refresh_writes_the_allocation_into_metrics(synth_work, tmp_path):
    from cir_mine.train.loop import TrainConfig, train

    negs = tmp_path / "negs.parquet"
    mine_to_file(Workspace(synth_work), "train", MineConfig(strategy="error-targeted", k=4, device="cpu"), negs)
    assert sum(read_negatives(negs).meta["prepared"]["error-targeted"]["k"].values()) == 4
    cfg = TrainConfig(
        work=str(synth_work),
        out=str(tmp_path / "run"),
        negatives=str(negs),
        epochs=2,
        batch_size=64,
        width=0.5,
        threads=1,
        refresh_every=1,
    )
    train(cfg)  # the refresh re-mines through the table's Remine
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    alloc = rec["refresh"]["prepared"]["error-targeted"]
    assert alloc == read_negatives(tmp_path / "run" / "negs.round1.parquet").meta["prepared"]["error-targeted"]
    assert (
        sum(alloc["k"].values()) == 4
        and alloc["top1_right"] + alloc["top1_wrong"] + alloc["top1_other_category"] == 600
    )


def test_top1_sample_is_spread_and_bounded():
    from cir_mine.miner.core.strategies.error_targeted import sample_queries

    assert sample_queries(10, 20).tolist() == list(range(10))
    s = sample_queries(10000, 100)
    assert len(s) == 100 and s[0] == 0 and s[-1] == 9999 and (np.diff(s) > 0).all()
