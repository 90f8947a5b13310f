"""The mining core: each strategy's defining property on the synthetic world, determinism,
batch-size independence, shortfall accounting, mixes and schedules."""

import numpy as np
import pytest

from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core import attributes as A
from cir_mine.miner.core.mine import MineConfig, mine_negatives, mine_to_file
from cir_mine.miner.core.curriculum import mix_at, parse_schedule
from cir_mine.miner.core.scores import cap_mask, cap_threshold, delta, zero_shot_queries
from cir_mine.miner.core.strategies import REGISTRY, parse_mix, split_k
from cir_mine.miner.core.tables import read_negatives
from tests.builders import by_query, search_options
from tests.fixtures import tiny_workspace


@pytest.fixture(scope="module")
def world(synth_work):
    ws = Workspace(synth_work)
    g, t = ws.load("train")
    info = {
        "ws": ws,
        "g": g,
        "t": t,
        "attrs": dict(zip(g.image_ids.tolist(), g.attributes)),
        "cat": dict(zip(g.image_ids.tolist(), g.categories.tolist())),
        "emb": dict(zip(g.image_ids.tolist(), g.embeddings)),
        "req": {q: A.extract(" and ".join(c)) for q, c in zip(t.query_ids.tolist(), t.captions)},
        "ref": dict(zip(t.query_ids.tolist(), t.ref_ids.tolist())),
    }
    return info


# Every strategy and guard property holds whatever the search: exact (numpy's, or torch's on its CPU
# device, fp32 and bf16), or an approximate index whose candidates are re-ranked exactly (IVF tuned
# to the default target recall, HNSW likewise).
INDEXES = ["flat", "torch-fp32", "torch-bf16", "IVF16,Flat", "hnsw"]


def mine(world, **kw):
    kw.setdefault("k", 10)
    kw.setdefault("candidates", 300)
    cfg_options, call_options = search_options(kw.pop("index", "flat"))
    return mine_negatives(world["ws"], "train", MineConfig.of(**kw, **cfg_options), **call_options)


# -- scores ----------------------------------------------------------------------------------------


def test_zero_shot_and_delta():
    ref = np.array([[1, 0, 0]], np.float32)
    text = np.array([[0, 1, 0]], np.float32)
    q = zero_shot_queries(ref, text, 1.0)
    assert np.allclose(q, [[2**-0.5, 2**-0.5, 0]])
    assert np.allclose(zero_shot_queries(ref, text, 0.0), ref)
    assert np.allclose(delta(np.array([0.5], np.float32), np.array([[0.2, 0.7]], np.float32)), [[0.3, -0.2]])


def test_cap_is_sign_safe():
    ts = np.array([0.5, -0.5], np.float32)
    assert np.allclose(cap_threshold(ts, 0.9), [0.45, -0.55])
    scores = np.array([[0.46, 0.44], [-0.52, -0.56]], np.float32)
    # naive rho * s(q,t) = -0.45 for the negative target score would keep -0.52 > s(q,t)... wrongly:
    assert cap_mask(scores, ts, 0.9).tolist() == [[True, False], [True, False]]
    # never keeps a candidate scoring above the target, whatever the sign
    rng = np.random.default_rng(0)
    t = rng.uniform(-1, 1, 200).astype(np.float32)
    s = rng.uniform(-1, 1, (200, 50)).astype(np.float32)
    kept = ~cap_mask(s, t, 0.95)
    assert (s[kept] <= np.repeat(t[:, None], 50, 1)[kept]).all()


# -- strategies --------------------------------------------------------------------------------


def no_guard_violation(world, table, cfg: MineConfig):
    t = world["t"]
    extra = dict(zip(t.query_ids.tolist(), t.extra_positive_ids))
    for r in table.to_pylist():
        assert r["neg_id"] not in (r["target_id"], r["ref_id"])
        assert r["neg_id"] not in extra[r["query_id"]]
        s_ct = float(world["emb"][r["neg_id"]] @ world["emb"][r["target_id"]])
        assert s_ct < cfg.guards.dup_threshold
        ts = r["target_score"]
        assert r["score"] <= ts - (1 - cfg.guards.rho) * abs(ts) + 1e-6


@pytest.mark.parametrize("name", [n for n in REGISTRY if n not in ("in-batch", "verified")])
@pytest.mark.parametrize("index", INDEXES)
def test_every_strategy_respects_guards_and_k(world, index, name):
    res = mine(world, index=index, strategy=name)
    tb = res.table
    no_guard_violation(world, tb, MineConfig())
    groups = by_query(tb)
    assert all(len(v) <= 10 for v in groups.values())
    assert all(len({r["neg_id"] for r in v}) == len(v) for v in groups.values())
    assert set(tb.column("strategy").to_pylist()) <= {name}
    short = {q for q in world["t"].query_ids.tolist() if len(groups.get(q, [])) < 10}
    assert set(res.shortfall) == short and res.meta["shortfall"]["count"] == len(short)
    assert np.allclose(tb["delta"].to_numpy(), tb["target_score"].to_numpy() - tb["score"].to_numpy(), atol=1e-6)


@pytest.mark.parametrize("index", INDEXES)
def test_midzone_in_window_and_sampled_not_top(world, index):
    lo, hi = 0.0, 0.25
    rnd = mine(world, index=index, strategy="midzone", delta_lo=lo, delta_hi=hi, rho=None)
    d = rnd.table["delta"].to_numpy()
    assert rnd.table.num_rows > 1000 and d.min() >= lo - 1e-6 and d.max() <= hi + 1e-6
    top = mine(world, index=index, strategy="midzone", delta_lo=lo, delta_hi=hi, rho=None, sample="top")
    assert top.table["delta"].to_numpy().min() >= lo - 1e-6
    # uniform within the zone: ranks differ from the top-of-zone picks, and reach deeper
    assert rnd.table["rank"].to_numpy().mean() > top.table["rank"].to_numpy().mean()


@pytest.mark.parametrize("index", INDEXES)
def test_semihard_window(world, index):
    res = mine(world, index=index, strategy="semihard", margin=0.05, rho=None)
    d = res.table["delta"].to_numpy()
    assert res.table.num_rows > 500 and (d > 0).all() and (d < 0.05).all()


@pytest.mark.parametrize("index", INDEXES)
def test_hardest_rank_window_and_order(world, index):
    res = mine(world, index=index, strategy="hardest", range_min=5, range_max=40, rho=None)
    ranks = res.table["rank"].to_numpy()
    assert ranks.min() >= 5 and ranks.max() < 40
    for rows in by_query(res.table).values():
        rk = [r["rank"] for r in rows]
        assert rk == sorted(rk)
    # the hardest are taken first: with guards off, a query gets exactly ranks 5..14
    res = mine(
        world,
        index=index,
        strategy="hardest",
        range_min=5,
        range_max=40,
        rho=None,
        dup_threshold=None,
        exclude_target=False,
        exclude_reference=False,
        exclude_extra_positives=False,
    )
    first = by_query(res.table)[world["t"].query_ids[0]]
    assert [r["rank"] for r in first] == list(range(5, 15))


@pytest.mark.parametrize("index", INDEXES)
def test_category_shares(world, index):
    res = mine(world, index=index, strategy="category", category_shares=(0.7, 0.2, 0.1))
    assert res.meta["shortfall"]["count"] <= 5
    for rows in by_query(res.table).values():
        if len(rows) < 10:
            continue
        same = sum(r["category_match"] for r in rows)
        assert 7 <= same <= 8, same  # 7 same-category + the random one may match
        assert (rows[0]["rank"], rows[-1]["rank"]) == (-1, -1)
    res = mine(world, index=index, strategy="category", category_shares=(0.0, 1.0, 0.0))
    assert not any(res.table["category_match"].to_pylist())


def _status(world, neg, qid):
    return A.requested_status(world["attrs"][neg], world["req"][qid], ref_attrs=world["attrs"][world["ref"][qid]])


@pytest.mark.parametrize("pool", ["target", "query"])
@pytest.mark.parametrize("index", INDEXES)
def test_category_discrepant(world, index, pool):
    res = mine(world, index=index, strategy="category-discrepant", discrepant_pool=pool, discrepant_kept_share=0.0)
    assert res.table.num_rows > 500
    if pool == "target":
        assert set(res.table["rank"].to_pylist()) == {-1}
    for qid, rows in by_query(res.table).items():
        for r in rows:
            assert False in _status(world, r["neg_id"], qid).values()
        t = world["emb"][rows[0]["target_id"]]
        sims = [float(world["emb"][r["neg_id"]] @ t) for r in rows]
        assert sims == sorted(sims, reverse=True)  # nearest to the target first


@pytest.mark.parametrize("index", INDEXES)
def test_attribute_mismatch_differs_exactly_in_requested_group(world, index):
    res = mine(world, index=index, strategy="attribute-mismatch", candidates=1000, mismatch_kept_share=0.0)
    assert res.table.num_rows > 100
    for r in res.table.to_pylist():
        req = world["req"][r["query_id"]]
        gn, gt = A.group_values(world["attrs"][r["neg_id"]]), A.group_values(world["attrs"][r["target_id"]])
        differ = {g for g in set(gn) | set(gt) if gn.get(g) != gt.get(g)}
        assert differ and differ <= set(req.groups), (differ, req.groups)
        assert False in _status(world, r["neg_id"], r["query_id"]).values()


def _contradicted_as_reference(world, neg, qid) -> set:
    """Requested groups the negative contradicts with the reference's own value there."""
    gn, gr = A.group_values(world["attrs"][neg]), A.group_values(world["attrs"][world["ref"][qid]])
    return {g for g, s in _status(world, neg, qid).items() if s is False and g in gn and gn[g] == gr.get(g)}


@pytest.mark.parametrize(
    "strategy,param", [("attribute-mismatch", "mismatch_ref_value"), ("category-discrepant", "discrepant_ref_value")]
)
def test_reference_value_switch(world, strategy, param):
    """Off (the default), no negative contradicts the caption with the reference's own value (so
    none copies the reference's attributes); on, the strategy picks such negatives too."""
    share = "mismatch_kept_share" if strategy == "attribute-mismatch" else "discrepant_kept_share"
    kw = dict(strategy=strategy, candidates=1000, **{share: 0.0})
    on = mine(world, **kw, **{param: True}).table.to_pylist()
    default = mine(world, **kw)
    assert default.meta["config"]["params"][strategy][param] is False
    off = default.table.to_pylist()
    assert len(off) > 100
    assert any(_contradicted_as_reference(world, r["neg_id"], r["query_id"]) for r in on)
    for r in off:
        assert not _contradicted_as_reference(world, r["neg_id"], r["query_id"]), r
        assert False in _status(world, r["neg_id"], r["query_id"]).values()


def _kept_mismatch(world, neg, qid) -> bool:
    """The negative satisfies the caption (no requested group contradicted) and differs from the
    target in a group the caption does not mention."""
    req = world["req"][qid]
    if False in _status(world, neg, qid).values():
        return False
    gn = A.group_values(world["attrs"][neg])
    gt = A.group_values(world["attrs"][by_target(world)[qid]])
    return bool({g for g in set(gn) | set(gt) if gn.get(g) != gt.get(g)} - set(req.groups))


def by_target(world) -> dict:
    return dict(zip(world["t"].query_ids.tolist(), world["t"].target_ids.tolist()))


@pytest.mark.parametrize(
    "strategy,share", [("attribute-mismatch", "mismatch_kept_share"), ("category-discrepant", "discrepant_kept_share")]
)
@pytest.mark.parametrize("index", ["flat", "IVF16,Flat"])
def test_kept_share_is_the_mix_with_kept_mismatch(world, index, strategy, share):
    """By default half of the k slots of attribute-mismatch and category-discrepant go to
    kept-mismatch candidates: the table holds exactly the rows of the mix
    ``strategy:0.5,kept-mismatch:0.5`` of the pure strategy, every row contradicts the caption or
    is a kept-mismatch row, and no query gets more than its share of either kind."""
    default = mine(world, index=index, strategy=strategy, candidates=1000)
    assert default.meta["config"]["params"][strategy][share] == 0.5
    mixed = mine(world, index=index, mix=f"{strategy}:0.5,kept-mismatch:0.5", candidates=1000, **{share: 0.0})
    rows = lambda res: sorted(
        (r["query_id"], r["neg_id"], r["rank"], round(r["score"], 6)) for r in res.table.to_pylist()
    )
    assert rows(default) == rows(mixed) and len(rows(default)) > 500
    kinds = {}
    for r in default.table.to_pylist():
        contra = False in _status(world, r["neg_id"], r["query_id"]).values()
        assert contra or _kept_mismatch(world, r["neg_id"], r["query_id"]), r
        kinds.setdefault(r["query_id"], []).append(contra)
    assert max(sum(v) for v in kinds.values()) <= 5 and max(len(v) - sum(v) for v in kinds.values()) <= 5
    assert sum(len(v) - sum(v) for v in kinds.values()) > 200 and sum(sum(v) for v in kinds.values()) > 200
    # share 1: kept-mismatch rows only; share 0: caption-contradicting rows only
    only_kept = mine(world, index=index, strategy=strategy, candidates=1000, **{share: 1.0}).table.to_pylist()
    assert only_kept and all(_kept_mismatch(world, r["neg_id"], r["query_id"]) for r in only_kept)


@pytest.mark.parametrize("share", ["mismatch_kept_share", "discrepant_kept_share"])
def test_kept_share_out_of_range(world, share):
    with pytest.raises(UsageError, match=rf"^{share} 1.5: must be in \[0, 1\]\.$"):
        mine(world, strategy="attribute-mismatch", **{share: 1.5})


@pytest.mark.parametrize("index", INDEXES)
def test_soft_partial_overlap(world, index):
    res = mine(world, index=index, strategy="soft", soft_lo=0.2, soft_hi=0.8)
    assert res.table.num_rows > 500
    for r in res.table.to_pylist():
        ov = A.attr_overlap(world["attrs"][r["neg_id"]], world["attrs"][r["target_id"]])
        assert 0.2 < ov < 0.8 and abs(ov - r["attr_overlap"]) < 1e-6


@pytest.mark.parametrize("index", INDEXES)
def test_semantic_does_not_satisfy_request(world, index):
    res = mine(world, index=index, strategy="semantic")
    assert res.table.num_rows > 500
    for r in res.table.to_pylist():
        st = _status(world, r["neg_id"], r["query_id"])
        assert True not in st.values() and False in st.values()


def test_random_uniform_and_unranked(world):
    res = mine(world, strategy="random", k=20)
    assert res.meta["depth"] == 0 and set(res.table["rank"].to_pylist()) == {-1}
    counts = np.bincount(np.unique(res.table["neg_id"].to_numpy(), return_inverse=True)[1])
    assert len(counts) > 2500  # 12000 draws over a 3000-image gallery


def test_in_batch_is_trainer_side(world):
    res = mine(world, strategy="in-batch")
    assert res.table.num_rows == 0 and res.meta["bank"] == "in-batch" and res.meta["shortfall"]["count"] == 0
    res = mine(world, mix="midzone:0.5,in-batch:0.5")
    assert res.meta["bank"] == "mined+in-batch" and res.meta["k_mined"] == 5


# -- mixes, schedules, determinism ----------------------------------------------------------------


def test_split_k_and_parse_mix():
    assert split_k(10, [0.6, 0.3, 0.1]) == [6, 3, 1]
    assert split_k(7, [0.5, 0.5]) == [4, 3]
    assert split_k(3, [1 / 3] * 3) == [1, 1, 1]
    for k in range(1, 40):
        assert sum(split_k(k, [0.55, 0.25, 0.2])) == k
    assert parse_mix("midzone:3,random:1") == [("midzone", 0.75), ("random", 0.25)]
    with pytest.raises(UsageError, match="unknown strategy 'nope'"):
        parse_mix("nope:1")
    with pytest.raises(UsageError, match="appears twice"):
        parse_mix("random:1,random:2")


def test_mix_parts_no_duplicates(world):
    res = mine(world, mix="midzone:0.6,category:0.3,random:0.1", rho=None, delta_lo=0.0, delta_hi=0.3)
    assert [p["k"] for p in res.meta["parts"]] == [6, 3, 1]
    for rows in by_query(res.table).values():
        names = [r["strategy"] for r in rows]
        assert names == sorted(names, key=["midzone", "category", "random"].index)
        assert names.count("midzone") <= 6 and names.count("category") <= 3 and names.count("random") <= 1
        assert len({r["neg_id"] for r in rows}) == len(rows)


def test_schedule():
    s = parse_schedule("0:random,2:midzone,4:hardest")
    assert [e["from_epoch"] for e in s] == [0, 2, 4]
    assert mix_at(s, 0) == [("random", 1.0)] and mix_at(s, 3) == [("midzone", 1.0)] and mix_at(s, 9)[0][0] == "hardest"
    s = parse_schedule("0:random;3:midzone:0.7,random:0.3")
    assert mix_at(s, 5) == [("midzone", 0.7), ("random", 0.3)]
    with pytest.raises(UsageError, match="must start at epoch 0"):
        parse_schedule("1:random")
    with pytest.raises(UsageError, match="bad schedule entry 'x:random'"):
        parse_schedule("x:random")


def test_schedule_mines_the_round_and_is_stored(world):
    res = mine(world, schedule="0:random,2:midzone", k=5)
    assert set(res.table["strategy"].to_pylist()) == {"random"}
    res = mine(world, schedule="0:random,2:midzone", k=5, rho=None)
    res2 = mine_negatives(
        world["ws"], "train", MineConfig.of(schedule="0:random,2:midzone", k=5, rho=None), mining_round=2
    )
    assert set(res2.table["strategy"].to_pylist()) == {"midzone"} and set(res2.table["round"].to_pylist()) == {2}
    assert res2.meta["schedule"][1] == {"from_epoch": 2, "mix": [["midzone", 1.0]]}


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["midzone", "random", "category", "semihard", "midzone:0.5,category:0.3,random:0.2"])
def test_batched_equals_unbatched_and_seeded(world, spec):
    kw = dict(mix=spec, rho=None, delta_lo=0.0, delta_hi=0.3, seed=3)
    a = mine(world, query_batch=4096, **kw).table
    b = mine(world, query_batch=37, **kw).table
    assert a.equals(b)
    assert mine(world, query_batch=100, **kw).table.equals(a)
    c = mine(world, **{**kw, "seed": 4}).table
    if spec != "semihard":
        assert not c.drop(["seed"]).equals(a.drop(["seed"]))


def test_query_emb_equals_zero_shot(world):
    from cir_mine.miner.core.scores import zero_shot_queries

    g, t = world["g"], world["t"]
    q = zero_shot_queries(g.embeddings[g.rows(t.ref_ids.tolist(), t.categories.tolist())], t.text_embeddings)
    a = mine(world, strategy="midzone").table
    b = mine_negatives(world["ws"], "train", MineConfig.of(strategy="midzone", k=10, candidates=300), query_emb=q)
    assert b.table.equals(a) and b.meta["query_source"] == "provided"
    with pytest.raises(DataError, match=r"query_emb: shape \(5, 32\), expected \(600, 32\)"):
        mine_negatives(world["ws"], "train", MineConfig.of(strategy="midzone"), query_emb=q[:5])
    with pytest.raises(UsageError, match="`query` checkpoint needs query embeddings") as e:
        mine_negatives(world["ws"], "train", MineConfig.of(strategy="midzone", query="checkpoint"))
    assert e.value.render(lambda p: "--" + p) == (
        "--query checkpoint needs query embeddings from a trained model: pass --checkpoint RUN/ckpt.pt."
    )


def test_config_roundtrip_and_remine_from_footer(world, tmp_path):
    cfg = MineConfig.of(mix="midzone:0.7,random:0.3", k=6, seed=11, rho=0.9, category_shares=(0.5, 0.3, 0.2))
    assert MineConfig.from_dict(cfg.to_dict()) == cfg
    out = tmp_path / "negs.parquet"
    res = mine_to_file(world["ws"], "train", cfg, out)
    back = read_negatives(out, world["ws"])
    assert back.table.equals(res.table)
    again = mine_negatives(world["ws"], "train", MineConfig.from_dict(back.config))
    assert again.table.equals(back.table)
    assert back.meta["manifest_hash"] == world["ws"].manifest_hash() and back.meta["k"] == 6
    assert set(back.meta["guards"]) >= {"target", "reference", "extra_positive", "near_duplicate", "cap"}
    with pytest.raises(UsageError, match="unknown mining config key"):
        MineConfig.from_dict({"nope": 1})


def test_shortfall_is_exact(world):
    res = mine(world, strategy="semihard", margin=0.01, k=10)
    groups = by_query(res.table)
    short = [q for q in world["t"].query_ids.tolist() if len(groups.get(q, [])) < 10]
    assert res.meta["shortfall"]["query_ids"] == short and res.meta["shortfall"]["count"] == len(short) > 0
    assert res.meta["shortfall"]["missing"] == sum(10 - len(groups.get(q, [])) for q in short)
    assert res.meta["n_rows"] == res.table.num_rows


def test_bad_config_names_the_parameters():
    with pytest.raises(UsageError, match="give either strategy or mix") as e:
        MineConfig.of(strategy="random", mix="random:1").validate()
    assert e.value.params == ("strategy", "mix")
    with pytest.raises(UsageError, match="nothing to mine"):
        MineConfig().validate()
    with pytest.raises(UsageError, match=r"^delta_lo \(0.5\) is above delta_hi \(0.1\); swap them.$") as e:
        MineConfig.of(strategy="midzone", delta_lo=0.5, delta_hi=0.1).validate()
    assert (
        e.value.render(lambda p: "--" + p.replace("_", "-")) == "--delta-lo (0.5) is above --delta-hi (0.1); swap them."
    )
    with pytest.raises(
        UsageError, match=r"^rho must be in \(0, 1\] \(got 2.0\); switch the cap off with rho=None.$"
    ) as e:
        MineConfig.of(strategy="midzone", rho=2.0).validate()
    assert e.value.render({"rho": "--rho", "rho=None": "--no-guard cap"}.get) == (
        "--rho must be in (0, 1] (got 2.0); switch the cap off with --no-guard cap."
    )
    with pytest.raises(UsageError, match="unknown mining option"):
        MineConfig.of(delta_low=0.1)


@pytest.mark.slow
def test_fiq_proxy_midzone_completes(fiq_proxy):
    ws = Workspace(fiq_proxy)
    res = mine_negatives(ws, "train", MineConfig.of(strategy="midzone", k=5, rho=None, delta_lo=-0.05, delta_hi=0.2))
    assert res.meta["n_queries"] == 8847 and res.table.num_rows > 10000
    d = res.table["delta"].to_numpy()
    assert d.min() >= -0.05 - 1e-6 and d.max() <= 0.2 + 1e-6


def test_short_queries_are_searched_deeper(synth_work):
    """Adaptive depth: short queries gain negatives; queries that were not short keep their rows."""
    from cir_mine.data.workspace import Workspace
    from cir_mine.miner.core.mine import MineConfig, mine_negatives

    ws = Workspace(synth_work)
    base = dict(strategy="hardest", k=10, seed=1, candidates=16)
    flat = mine_negatives(ws, "train", MineConfig.of(**base, max_candidates=None))
    deep = mine_negatives(ws, "train", MineConfig.of(**base, max_candidates=1024))
    assert flat.meta["shortfall"]["count"] > deep.meta["shortfall"]["count"]
    assert deep.meta["deepened_queries"] >= flat.meta["shortfall"]["count"]
    short = set(flat.meta["shortfall"]["query_ids"])
    key = lambda t: sorted((r["query_id"], r["neg_id"], r["rank"]) for r in t.to_pylist() if r["query_id"] not in short)
    assert key(flat.table) == key(deep.table)
    # a deepened query's negatives still obey the cap and sit in rank order
    rows = [r for r in deep.table.to_pylist() if r["query_id"] in short]
    assert rows and all(r["score"] <= cap_threshold(np.float32(r["target_score"]), 0.95) + 1e-6 for r in rows)


@pytest.mark.parametrize("strategy", ["hardest", "midzone"])
def test_rows_do_not_depend_on_how_deep_a_batch_is_searched(synth_work, strategy):
    """The same table whether short queries are mined again from the rows of their first search
    (searched 4x deeper, or at the deepest depth at once after a batch that was mostly short; those
    rows re-scored when asked or with the batch) or searched again one depth at a time, through
    any kernel, and at any batch size."""
    from cir_mine.miner.accel import device_search
    from cir_mine.miner.core.search.backends import ExactSearch
    from cir_mine.miner.core.mine import MineConfig, mine_negatives

    ws = Workspace(synth_work)
    xb = ws.load("train")[0].embeddings

    class OneDepthAtATime(ExactSearch):
        cheap_depth = False

    class DeepestAtOnce(ExactSearch):
        deep_share = 0.0

    class NeverSwitch(ExactSearch):
        deep_share = None

    class DeepRowsScoredAtOnce(ExactSearch):
        search_ahead = None  # the reserve's rows re-scored with the batch, not when asked

    cfg = MineConfig.of(
        strategy=strategy, k=10, seed=3, candidates=16, max_candidates=1024, query_batch=97, delta_lo=0.0, delta_hi=0.2
    )
    ref = mine_negatives(ws, "train", cfg)
    assert ref.meta["deepened_queries"] > 0 and ref.meta["depth"] > 16
    for cls in (OneDepthAtATime, DeepestAtOnce, NeverSwitch, DeepRowsScoredAtOnce):
        res = mine_negatives(ws, "train", cfg, index=cls(xb, device="cpu"))
        assert res.table.equals(ref.table), cls.__name__
    res = mine_negatives(ws, "train", cfg, index=device_search)  # the bfloat16 scan in the race
    assert res.table.equals(ref.table)
    res = mine_negatives(ws, "train", cfg.replace(query_batch=4096))
    assert res.table.equals(ref.table)


def test_cap_with_a_negative_target_score_keeps_only_candidates_below_it(tmp_path):
    """s(q, t) = -0.5 < 0: the naive cap rho * s(q,t) = -0.475 would keep candidates scoring between
    the target and -0.475 (above the target, likely false negatives); the sign-safe cap keeps only
    s(q, c) <= s(q,t) - (1 - rho)|s(q,t)| = -0.525. The query is short at the first depth (the top
    of its ranking is all above the target), so the deepened search is the one that must obey it."""
    d = 64
    e = np.eye(d, dtype=np.float32)
    at = lambda s, j: s * e[0] + np.sqrt(1 - s * s) * e[j]  # unit vector with s(q, .) = s
    above = [0.9 - 0.04 * i for i in range(20)]  # far above the target
    between = [-0.48, -0.485, -0.49]  # above it, under the naive cap
    below = [-0.6, -0.7, -0.8]  # what a sign-safe cap keeps
    scores = above + between + below
    emb = np.stack([at(-0.5, 1), e[2]] + [at(s, 3 + j) for j, s in enumerate(scores)])
    ids = ["target", "ref"] + [f"c{j:02d}" for j in range(len(scores))]
    ws = tiny_workspace(
        tmp_path / "w",
        emb,
        ids,
        ["dress"] * len(ids),
        [[] for _ in ids],
        [{"ref": "ref", "target": "target", "text": e[0]}],
    )
    res = mine_negatives(
        ws, "train", MineConfig.of(strategy="hardest", k=3, candidates=8, max_candidates=64, rho=0.95), query_emb=e[:1]
    )
    t = res.table.to_pylist()
    assert abs(t[0]["target_score"] + 0.5) < 1e-6 and res.meta["deepened_queries"] == 1
    assert sorted(round(r["score"], 4) for r in t) == sorted(below)
    assert res.meta["guards"]["cap"]["removed"] == len(above) + len(between)
