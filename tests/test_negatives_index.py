"""Mining through an index: the search back-end contract, exact re-ranking, tuned and checked
recall, the workspace index, refresh rounds that search like round 0, prefetching, and the CLI."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.search import exact as exact_mod
from cir_mine.miner.core.search.backends import ExactSearch, Reranked
from cir_mine.miner.core.search.build import build_index
from cir_mine.miner.core.search.exact import exact_rescore, gemm_topk
from cir_mine.miner.core.search import lists as lists_mod
from cir_mine.miner.core.search.lists import (
    ListLayout,
    coarse_assign,
    ivf_flat_lists,
    list_major_search,
    probe_positions,
)
from cir_mine.miner.core.search.measure import KernelRace
from cir_mine.miner.core.search.params import parse_search_params
from cir_mine.miner.core.search.topk import merge_topk, topk_desc
from cir_mine.miner.core.search.tuning import by_lists, candidate_recall, recall_by_nprobe, tune, tune_deep
from cir_mine.miner.core.mine import MineConfig, mine_negatives, mine_to_file
from cir_mine.miner.core.scores import zero_shot_queries
from cir_mine.data.workspace import file_digest
from tests.builders import brute_force_search
from cir_mine.miner.core.tables import read_negatives

runner = CliRunner()


@pytest.fixture(scope="module")
def world(synth_work):
    ws = Workspace(synth_work)
    g, t = ws.load("train")
    xq = zero_shot_queries(g.embeddings[g.rows(t.ref_ids.tolist(), t.categories.tolist())], t.text_embeddings)
    return {"ws": ws, "g": g, "t": t, "xq": xq, "emb": dict(zip(g.image_ids.tolist(), g.embeddings))}


def mine(world, **kw):
    kw.setdefault("k", 10)
    kw.setdefault("candidates", 200)
    return mine_negatives(world["ws"], "train", MineConfig.of(**kw))


# -- engine pieces --------------------------------------------------------------------------------


def test_exact_search_blocked_equals_brute_force():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((1000, 16)).astype(np.float32)
    xq = rng.standard_normal((37, 16)).astype(np.float32)
    D0, I0 = brute_force_search(xb, xq, 50)
    for backend in (ExactSearch(xb, device="cpu"), ExactSearch(xb, blocked=True, block_rows=128)):
        D, I = backend.search(xq, 50)
        assert np.allclose(D, D0, atol=1e-5) and (I == I0).mean() > 0.99  # ties may swap


def test_gemm_topk_is_the_flat_index_at_every_block_and_step(tmp_path, monkeypatch):
    """The CPU exact search (GEMM steps into FAISS heaps) returns faiss.IndexFlatIP's rows whatever
    the block and step sizes, over in-memory and memory-mapped galleries, at depths up to n."""
    import faiss

    rng = np.random.default_rng(3)
    xb = rng.standard_normal((3001, 24)).astype(np.float32)
    xq = rng.standard_normal((65, 24)).astype(np.float32)
    flat = faiss.IndexFlatIP(24)
    flat.add(xb)
    np.save(tmp_path / "xb.npy", xb)
    mm = np.load(tmp_path / "xb.npy", mmap_mode="r")
    monkeypatch.setattr(exact_mod, "GEMM_SCORES", 65 * 1024)  # a step of 1024 rows: 3 steps and a tail
    for k in (1, 50, 3001):
        D0, I0 = flat.search(xq, k)
        for x, block in ((xb, 262_144), (xb, 700), (mm, 1000)):
            D, I = gemm_topk(xq, x, k, block, release=x is mm)
            assert (I == I0).mean() > 0.999 and np.allclose(D, D0, atol=1e-5)


def test_reranked_scores_are_exact_and_sorted():
    """Whatever rows a source returns, and whatever scores it claims, Reranked returns exact dots."""
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((500, 8)).astype(np.float32)
    xq = rng.standard_normal((20, 8)).astype(np.float32)

    class Noisy:  # an approximate source: random rows, wrong scores
        ntotal, d = 500, 8

        def search(self, x, k):
            I = np.stack([rng.choice(500, k, replace=False) for _ in range(len(x))])
            I[:, -1] = -1  # and a missing slot
            return np.zeros(I.shape, np.float32), I

    D, I = Reranked(Noisy(), xb, 2.0).search(xq, 30)
    ok = I >= 0
    assert np.allclose(D[ok], np.einsum("ij,ij->i", xb[I[ok]], np.repeat(xq, 30, 0)[ok.ravel()]), atol=1e-5)
    assert (np.diff(np.where(ok, D, -np.inf), axis=1) <= 1e-7).all()


def test_parse_search_params_and_errors():
    assert parse_search_params("nprobe=16, efSearch=64") == {"nprobe": 16, "efSearch": 64}
    assert parse_search_params(None) == {}
    with pytest.raises(UsageError, match=r"search_params 'nprobe': use name=integer pairs"):
        parse_search_params("nprobe")
    with pytest.raises(UsageError, match="give either search_params or nprobe / ef_search"):
        MineConfig.of(strategy="hardest", search_params="nprobe=2", nprobe=3).validate()
    with pytest.raises(UsageError, match=r"target_recall must be in \(0, 1\]"):
        MineConfig.of(strategy="hardest", target_recall=1.5).validate()


def test_candidate_recall():
    e = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert candidate_recall(e, e) == 1.0
    assert candidate_recall(np.array([[1, 2, 9, -1], [5, 6, 7, 8]]), e) == 6 / 8


# -- mining through an index ------------------------------------------------------------------------


@pytest.mark.parametrize("index", ["IVF16,Flat", "hnsw", "IVF16,PQ8x4"])
def test_every_written_score_is_exact(world, index):
    res = mine(world, mix="hardest:0.5,midzone:0.5", index=index, delta_lo=0.0, delta_hi=0.3)
    tb = res.table.to_pylist()
    assert len(tb) > 2000 and res.meta["search"]["exact"] is False
    qi = {q: i for i, q in enumerate(world["t"].query_ids.tolist())}
    for r in tb[::7]:
        s = float(world["emb"][r["neg_id"]] @ world["xq"][qi[r["query_id"]]])
        assert abs(r["score"] - s) < 1e-5 and abs(r["delta"] - (r["target_score"] - r["score"])) < 1e-6


def test_ivf_probing_every_list_equals_flat(world):
    kw = dict(mix="hardest:0.5,midzone:0.5", delta_lo=0.0, delta_hi=0.3, seed=2)
    flat = mine(world, **kw)
    ivf = mine(world, index="IVF16,Flat", nprobe=16, **kw)
    assert ivf.table.equals(flat.table)
    assert ivf.meta["search"]["params"] == {"nprobe": 16} and "tuning" not in ivf.meta["search"]
    assert flat.meta["search"]["index"] == "flat" and flat.meta["search"]["exact"] is True


def test_tuning_reaches_the_target_recall_and_is_recorded(world):
    res = mine(world, strategy="hardest", index="IVF16,Flat", target_recall=0.9, tune_queries=200, check_recall=150)
    s = res.meta["search"]
    tu = s["tuning"]
    assert tu["param"] == "nprobe" and tu["reached"] and tu["recall"] >= 0.9 and tu["queries"] == 200
    assert s["params"] == {"nprobe": tu["value"]} and tu["tried"][-1][0] == tu["value"]
    assert all(r < 0.9 for _, r, _ in tu["tried"][:-1])  # the cheapest value that reaches it
    ck = s["check"]
    assert ck["queries"] == 150 and 0.85 <= ck["candidate_recall"] <= 1 and 0 < ck["negative_overlap"] <= 1
    # no tuning: FAISS defaults (nprobe=1), measured by the check
    low = mine(world, strategy="hardest", index="IVF16,Flat", target_recall=None, check_recall=150)
    assert (
        low.meta["search"]["params"] == {"nprobe": 1} and low.meta["search"]["check"]["candidate_recall"] < tu["recall"]
    )


def test_recall_references_search_through_the_device_rule(world):
    """Tuning's and check_recall's exact reference is searched by the exact back-end the device
    rule's factory makes for this gallery (on the CPU the bfloat16 scan races the core's kernels),
    as exact mining is, made once for both (its gallery copy and kernel race serve the check too);
    the table, the tuning and the recall report equal the core's own."""
    from cir_mine.miner.accel.open import device_search

    asked = []

    def factory(xb, cfg):
        asked.append(cfg.index)
        return device_search(xb, cfg)

    kw = dict(strategy="hardest", index="IVF16,Flat", target_recall=0.9, tune_queries=200, check_recall=150)
    own = mine(world, **kw)
    via = mine_negatives(world["ws"], "train", MineConfig.of(k=10, candidates=200, **kw), index=factory)
    assert asked == ["IVF16,Flat", "flat"]  # the back-end, the reference of the tuning and the check
    assert via.table.equals(own.table)

    def timeless(rec):
        return {k: timeless(v) if isinstance(v, dict) else v for k, v in rec.items() if k != "seconds"}

    for record in ("tuning", "check"):
        assert timeless(via.meta["search"][record]) == timeless(own.meta["search"][record])


def test_check_recall_on_exact_search_is_one(world):
    res = mine(world, strategy="midzone", check_recall=100)
    assert res.meta["search"]["check"]["candidate_recall"] == 1.0
    assert res.meta["search"]["check"]["negative_overlap"] == 1.0


def test_remembered_exact_search_answers_shallower_searches_of_the_same_vectors():
    """The check's reference keeps each query vector's deepest exact rows: a search no deeper is
    answered from them with the rows a fresh search returns, a deeper or new one is searched, and
    ``search_ahead``'s deep rows are kept too."""
    from cir_mine.miner.core.recall import Remembered

    rng = np.random.default_rng(3)
    xb = rng.standard_normal((2000, 16)).astype(np.float32)
    xb[1] = xb[0]  # a tie: the lower row first, in every answer
    xq = rng.standard_normal((40, 16)).astype(np.float32)
    xq[5] = xb[0]
    inner = ExactSearch(xb, device="cpu")
    calls = []

    class Counted:
        ntotal, d, exact = inner.ntotal, inner.d, True

        def search(self, q, k):
            calls.append(("search", len(q), k))
            return inner.search(q, k)

        def search_ahead(self, q, k, deep):
            calls.append(("ahead", len(q), k, deep))
            return inner.search_ahead(q, k, deep)

    mem = Remembered(Counted())
    assert mem.exact is True and mem.ntotal == 2000  # everything else is the wrapped back-end's
    D, I, later = mem.search_ahead(xq, 20, 300)
    Dl, Il = later(np.arange(0, 40, 3))
    for q, k in ((xq, 20), (xq[::3], 300), (xq[::3], 150), (xq[[5, 0, 5]], 7)):
        n = len(calls)
        got = mem.search(q, k)
        assert len(calls) == n  # answered from the kept rows
        want = inner.search(q, k)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    assert mem.search(xq[:2], 300)[1].shape == (2, 300) and calls[-1] == ("search", 2, 300)  # not searched that deep
    assert mem.search(xq[:2], 5000)[1].shape == (2, 2000)  # never deeper than the gallery
    assert np.array_equal(Il, inner.search(xq[::3], 300)[1]) and np.array_equal(I, inner.search(xq, 20)[1])


def test_check_recall_report_equals_the_unremembered_one(world, monkeypatch):
    """The check answers its candidate-recall search from exact mining's rows: the same report as
    searching again."""
    from cir_mine.miner.core import recall

    kw = dict(strategy="hardest", index="IVF16,Flat", nprobe=2, check_recall=150)
    own = mine(world, **kw).meta["search"]["check"]
    monkeypatch.setattr(recall, "Remembered", lambda exact: exact)
    plain = mine(world, **kw).meta["search"]["check"]
    assert {k: v for k, v in own.items() if k != "seconds"} == {k: v for k, v in plain.items() if k != "seconds"}
    assert own["candidate_recall"] < 1


def test_any_backend_with_the_contract_is_used_as_given(world):
    """A sharded or remote engine plugs in as an object with search/ntotal/d/exact/describe."""
    xb = world["g"].embeddings

    class Shards:  # two shards, exact top-k each, merged
        ntotal, d, exact = xb.shape[0], xb.shape[1], True
        calls = 0

        def search(self, xq, k):
            Shards.calls += 1
            half = self.ntotal // 2
            D1, I1 = brute_force_search(xb[:half], xq, k)
            D2, I2 = brute_force_search(xb[half:], xq, k)
            return merge_topk([(D1, I1), (D2, I2 + half)], k)

        def describe(self):
            return {"index": "shards", "exact": True, "params": {}}

    kw = dict(strategy="hardest", rho=None)
    a = mine(world, **kw)
    b = mine_negatives(world["ws"], "train", MineConfig.of(k=10, candidates=200, **kw), index=Shards())
    assert Shards.calls > 0 and b.meta["search"]["index"] == "shards"
    assert b.table.drop(["score", "delta"]).equals(a.table.drop(["score", "delta"]))
    assert np.allclose(b.table["score"].to_numpy(), a.table["score"].to_numpy(), atol=1e-5)

    class Wrong(Shards):
        ntotal = 10

    with pytest.raises(DataError, match="the search back-end has d=32 and 10 rows but the gallery has d=32 and 3000"):
        mine_negatives(world["ws"], "train", MineConfig.of(strategy="hardest"), index=Wrong())


def test_prefetch_equals_sequential(world):
    kw = dict(mix="hardest:0.5,midzone:0.5", index="hnsw", ef_search=64, query_batch=50)
    a = mine(world, prefetch=False, **kw)
    b = mine(world, prefetch=True, **kw)
    assert a.table.equals(b.table) and b.meta["search"]["prefetch"] is True


def test_prefetch_is_off_by_default_on_the_cpu(world):
    """On the CPU the search uses every core: a second search beside it only slows mining."""
    assert mine(world, strategy="hardest").meta["search"]["prefetch"] is False


# -- the workspace index and refresh rounds -----------------------------------------------------------


@pytest.fixture
def indexed(synth_work, tmp_path):
    from cir_mine.miner.encode.index import index_workspace

    work = tmp_path / "work"
    shutil.copytree(synth_work, work)
    index_workspace(work, "train", "IVF16,Flat", device="cpu")
    return Workspace(work)


def test_an_index_of_the_very_gallery_file_read_skips_its_content_hash(indexed, monkeypatch):
    """The index records its gallery file's digest. Mining whose gallery was read from a file of that
    digest does not hash the rows again (the file's bytes prove them); a gallery rewritten with the
    same rows in other bytes is checked by its content hash, and mines the same table."""
    import pyarrow.parquet as pq

    from cir_mine.miner.core.search import persist
    from cir_mine.miner.core.search.persist import index_meta
    from cir_mine.miner.encode.index import index_workspace

    p = indexed.gallery_path("train")
    assert index_meta(indexed.index_path("train"))["gallery_file"] == file_digest(p)
    assert indexed.load("train")[0].file_digest == file_digest(p)
    hashed = []
    real = persist.gallery_fingerprint
    monkeypatch.setattr(persist, "gallery_fingerprint", lambda *a, **k: hashed.append(1) or real(*a, **k))
    cfg = MineConfig.of(strategy="hardest", index="workspace", nprobe=4)
    ref = mine_negatives(indexed, "train", cfg).table
    assert hashed == [] and ref.num_rows > 0
    before = file_digest(p)
    pq.write_table(pq.read_table(p), p, compression="zstd")
    assert file_digest(p) != before
    assert mine_negatives(indexed, "train", cfg).table.equals(ref) and hashed == [1]
    # embeddings memory-mapped from gallery.train.npy: the table's bytes do not cover them
    index_workspace(indexed.root, "train", "IVF16,Flat", device="cpu", npy="float32")
    assert "gallery_file" not in index_meta(indexed.index_path("train"))
    assert indexed.load("train")[0].file_digest is None
    assert mine_negatives(indexed, "train", cfg).table.num_rows > 0 and hashed == [1, 1]


def test_workspace_index_is_searched_and_fingerprinted(indexed, tmp_path):
    res = mine_to_file(
        indexed, "train", MineConfig.of(strategy="hardest", index="workspace", nprobe=4), tmp_path / "n.parquet"
    )
    s = res.meta["search"]
    assert s["index"] == "workspace" and s["factory"] == "IVF16,Flat" and s["params"] == {"nprobe": 4}
    assert s["fingerprint"] == file_digest(indexed.index_path("train")) and s["file"] == "index.train.faiss"
    assert not (tmp_path / "n.parquet.faiss").exists()  # nothing saved: the workspace holds it


def _zero_shot(ws):
    g, t = ws.load("train")
    return zero_shot_queries(g.embeddings[g.rows(t.ref_ids.tolist(), t.categories.tolist())], t.text_embeddings)


@pytest.mark.parametrize("index", ["workspace", "hnsw"])
def test_refresh_searches_exactly_like_round_0(indexed, tmp_path, index):
    """With round 0's queries, a refresh round reproduces round 0's table: same index file, same
    tuned parameters, no re-tuning."""
    from cir_mine.miner.remine import Remine

    out = tmp_path / "negs.parquet"
    r0 = mine_to_file(
        indexed,
        "train",
        MineConfig.of(mix="hardest:0.5,midzone:0.5", k=6, index=index, target_recall=0.9, tune_queries=100),
        out,
    )
    assert "tuning" in r0.meta["search"]
    if index == "hnsw":
        assert (tmp_path / "negs.parquet.faiss").exists() and read_negatives(out).meta["search"][
            "file"
        ] == "negs.parquet.faiss"
    with Remine(indexed, "train", negatives=out) as remine:
        res = remine(_zero_shot(indexed), mining_round=1, epoch=1)
    table, meta = res.table, res.meta
    assert meta["search"]["params"] == r0.meta["search"]["params"] and "tuning" not in meta["search"]
    assert meta["search"].get("deep") == r0.meta["search"].get("deep")  # the deep search's tuned value too
    if index == "workspace":
        assert r0.meta["search"]["deep"]["depth"] == r0.meta["search"]["tuning"]["deep"]["depth"]
    assert meta["search"]["fingerprint"] == read_negatives(out).meta["search"]["fingerprint"]
    assert table.drop(["round"]).equals(r0.table.drop(["round"]))


def test_refresh_of_a_flat_table_never_uses_the_workspace_index(indexed, tmp_path):
    """A table mined exactly is refreshed exactly, even when the workspace holds an IVF index."""
    from cir_mine.miner.remine import Remine

    out = tmp_path / "negs.parquet"
    r0 = mine_to_file(indexed, "train", MineConfig.of(strategy="hardest", k=6), out)
    with Remine(indexed, "train", negatives=out) as remine:
        res = remine(_zero_shot(indexed), mining_round=1, epoch=1)
    table, meta = res.table, res.meta
    assert meta["search"]["exact"] is True and meta["search"]["index"] == "flat"
    assert table.drop(["round"]).equals(r0.table.drop(["round"]))


def test_refresh_refuses_a_changed_index(indexed, tmp_path):
    from cir_mine.miner.encode.index import index_workspace
    from cir_mine.miner.remine import Remine

    out = tmp_path / "negs.parquet"
    mine_to_file(indexed, "train", MineConfig.of(strategy="hardest", k=6, index="workspace", nprobe=2), out)
    index_workspace(indexed.root, "train", "IVF8,Flat", device="cpu")
    remine = Remine(indexed, "train", negatives=out)
    with pytest.raises(DataError, match=r"index.train.faiss: changed since .*negs.parquet was mined"):
        remine(_zero_shot(indexed), mining_round=1, epoch=1)


# -- CLI --------------------------------------------------------------------------------------------------


def test_cli_index_options_are_printed_and_stored(synth_work, tmp_path):
    out = tmp_path / "negs.parquet"
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(synth_work),
            "--strategy",
            "hardest",
            "-k",
            "5",
            "--index",
            "IVF16,Flat",
            "--target-recall",
            "0.9",
            "--check-recall",
            "100",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    s = read_negatives(out).meta["search"]
    tu = s["tuning"]
    assert (
        f"search: IVF16,Flat (IVF16,Flat, nprobe={tu['value']}; over-fetch 1, re-ranked exactly); tuned "
        f"nprobe={tu['value']}: candidate recall@512 {tu['recall']:.3f} on 600 queries (reached 0.9); "
        f"nprobe={tu['deep']['value']} at depth 2048, every search probes so: candidate recall {tu['deep']['recall']:.3f} (reached 0.9)"
    ) in r.output
    assert s["deep"] == {"depth": 2048, "params": {"nprobe": tu["deep"]["value"]}}
    assert tu["depth"] == 4 * 128 == s["depth"]  # tuned at the depth each batch is searched at
    ck = s["check"]
    assert (
        f"recall check on 100 queries: candidate recall@128 {ck['candidate_recall']:.3f}, mined negatives "
        f"shared with exact mining {ck['negative_overlap']:.3f}"
    ) in r.output
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(synth_work),
            "--strategy",
            "hardest",
            "--index",
            "flat",
            "--search-params",
            "nprobe",
            "--out",
            str(tmp_path / "x.parquet"),
        ],
    )
    assert r.exit_code == 2 and "Error: --search-params 'nprobe': use name=integer pairs" in r.output


def test_cli_workspace_index_missing(synth_work, tmp_path):
    r = runner.invoke(
        mine_app,
        [
            "negatives",
            "--work",
            str(synth_work),
            "--strategy",
            "hardest",
            "--index",
            "workspace",
            "--out",
            str(tmp_path / "x.parquet"),
        ],
    )
    assert r.exit_code == 1
    assert f"Error: {synth_work}/index.train.faiss: index not found. Build it with `cir-mine index" in r.output


# -- galleries larger than memory: memory-mapped embeddings -------------------------------------------


def _copy(synth_work, tmp_path) -> Workspace:
    work = tmp_path / "work"
    shutil.copytree(synth_work, work)
    return Workspace(work)


@pytest.mark.parametrize("index", ["flat", "IVF16,Flat"])
def test_memory_mapped_gallery_mines_the_same_table(synth_work, tmp_path, index):
    from cir_mine.miner.encode.index import write_gallery_npy

    ws = _copy(synth_work, tmp_path)
    cfg = MineConfig.of(mix="hardest:0.5,midzone:0.5", k=6, index=index, nprobe=None if index == "flat" else 16)
    ref = mine_negatives(ws, "train", cfg)
    write_gallery_npy(ws, "train")
    g = ws.gallery("train")
    assert isinstance(g.embeddings, np.memmap) and g.embeddings.shape == (3000, 32)
    got = mine_negatives(ws, "train", cfg)
    assert got.meta["search"].get("blocked", index != "flat") and got.table.equals(ref.table)


def test_gallery_without_embedding_column_reads_the_npy(synth_work, tmp_path):
    import pyarrow.parquet as pq

    from cir_mine.data.errors import SchemaError
    from cir_mine.data.workspace import write_embeddings_npy, write_table

    ws = _copy(synth_work, tmp_path)
    ref = mine_negatives(ws, "train", MineConfig.of(strategy="hardest", k=5))
    tb = pq.read_table(ws.gallery_path("train"))
    emb = np.stack(tb.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float16)
    write_table(tb.drop(["embedding"]), ws.gallery_path("train"))
    write_embeddings_npy(iter([emb[:1000], emb[1000:]]), 3000, 32, ws.embeddings_path("train"), np.float16)
    got = mine_negatives(ws, "train", MineConfig.of(strategy="hardest", k=5))
    assert got.meta["n_rows"] > 0.9 * ref.meta["n_rows"]
    e = emb.astype(np.float32)
    row = {i: r for r, i in enumerate(tb.column("image_id").to_pylist())}
    g, t = ws.load("train")
    xq = zero_shot_queries(
        np.asarray(g.embeddings[g.rows(t.ref_ids.tolist(), t.categories.tolist())], np.float32), t.text_embeddings
    )
    qi = {q: i for i, q in enumerate(t.query_ids.tolist())}
    for r in got.table.to_pylist()[::11]:  # float16 rows, scored in float32
        assert abs(r["score"] - float(e[row[r["neg_id"]]] @ xq[qi[r["query_id"]]])) < 1e-4
    np.save(ws.embeddings_path("train"), emb[:10])
    with pytest.raises(SchemaError, match=r"gallery.train.npy: holds float16\[10, 32\] but .* has 3000 rows"):
        ws.gallery("train")


def test_index_npy_cli(synth_work, tmp_path):
    ws = _copy(synth_work, tmp_path)
    r = runner.invoke(mine_app, ["index", "--work", str(ws.root), "--index", "IVF16,Flat", "--npy", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"wrote {ws.root}/gallery.train.npy: the gallery embeddings, memory-mapped by mining" in r.output
    assert np.load(ws.embeddings_path("train"), mmap_mode="r").shape == (3000, 32)


def test_hnsw_deeper_searches_keep_the_tuned_beam():
    """Deepening searches 4x and more deeper than the tuning measured; an HNSW beam of
    max(efSearch, k) would then fall to efSearch = k. The tuned beam-to-depth ratio is kept, so the
    deep search's recall stays at the tuned one (and above what the bare index gives)."""
    import faiss

    rng = np.random.default_rng(3)
    xb = rng.standard_normal((4000, 32)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(4000, 100, replace=False)] + 0.3 * rng.standard_normal((100, 32)).astype(np.float32)
    raw = build_index(xb, "HNSW8,Flat", device="cpu")
    backend = Reranked(raw, xb, 1.0, {"index": "hnsw"})
    exact = ExactSearch(xb, device="cpu")
    tuning = tune(backend, exact.search(xq, 10)[1], xq, 10, 0.95)
    ef = tuning.value
    assert backend.describe()["depth"] == 10 and backend.beam_for(10) is None
    assert backend.beam_for(40) == ef * 4
    deep = candidate_recall(backend.search(xq, 40)[1], exact.search(xq, 40)[1])
    _, bare = raw.search(xq, 40)  # the index alone: beam max(ef, 40)
    assert faiss.downcast_index(raw).hnsw.efSearch == ef
    assert deep >= min(0.95, tuning.recall) - 0.02
    assert deep >= candidate_recall(bare, exact.search(xq, 40)[1])


def test_ivf_deeper_searches_probe_proportionally_more_lists():
    rng = np.random.default_rng(4)
    xb = rng.standard_normal((3000, 16)).astype(np.float32)
    raw = build_index(xb, "IVF16,Flat", device="cpu")
    backend = Reranked(raw, xb, 1.0, {"index": "ivf", "depth": 10, "params": {"nprobe": 2}})
    assert backend.beam_for(10) is None and backend.beam_for(40) == 8 and backend.beam_for(1000) == 16  # <= nlist
    xq = rng.standard_normal((50, 16)).astype(np.float32)
    backend.set_params({"nprobe": 2})
    exact = ExactSearch(xb, device="cpu").search(xq, 40)[1]
    scaled = candidate_recall(backend.search(xq, 40)[1], exact)
    assert scaled > candidate_recall(raw.search(xq, 40)[1], exact)  # the bare index probes 2 lists


def test_gathered_dot_is_exact_and_the_same_for_any_split(tmp_path):
    """Re-scoring gives the float32 dot product of each listed row, -inf for -1 pads, the same bits
    whichever queries or rows are scored together, in memory or memory-mapped, and refuses a row
    outside the gallery instead of reading past it."""
    from cir_mine.miner.core.search.exact import gathered_dot

    rng = np.random.default_rng(4)
    xb = rng.standard_normal((800, 12)).astype(np.float32)
    rows = rng.integers(-1, 800, (40, 25))
    vec = rng.standard_normal((40, 12)).astype(np.float32)
    out = gathered_dot(xb, rows, vec)
    want = np.einsum("ijd,id->ij", xb[np.maximum(rows, 0)], vec)
    assert np.allclose(out[rows >= 0], want[rows >= 0], atol=1e-5) and (out[rows < 0] == -np.inf).all()
    assert np.array_equal(gathered_dot(xb, rows[7:19, 3:11], vec[7:19]), out[7:19, 3:11])
    np.save(tmp_path / "xb.npy", xb)
    assert np.array_equal(gathered_dot(np.load(tmp_path / "xb.npy", mmap_mode="r"), rows, vec), out)
    with pytest.raises(IndexError, match="row 800 is out of range for 800 gallery rows"):
        gathered_dot(xb, np.array([[800]]), vec[:1])
    half = gathered_dot(xb.astype(np.float16), rows, vec)  # float16 galleries: scored in float32
    assert np.allclose(half, out, atol=2e-2)


# -- list-major IVF search --------------------------------------------------------------------------


def _ivf(n=6000, d=24, nlist=40, seed=5, twins=0):
    import faiss

    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, d)).astype(np.float32)
    if twins:
        xb[n - twins :] = xb[:twins]  # exact duplicates: ties broken by the lower row
    index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index.add(xb)
    xq = rng.standard_normal((300, d)).astype(np.float32)
    return index, xb, xq


def _rows(D, I):
    return [set(i[i >= 0].tolist()) for i in I]


def _order_gap(xq, xb) -> float:
    """How far two float32 sums of the same products may differ (any summation order, any BLAS
    kernel): :func:`rounding_gap` times the largest query and gallery norms. Scores of two kernels
    are compared to this absolute tolerance, never a relative one, which near-zero scores fail."""
    from cir_mine.miner.core.search.exact import rounding_gap

    return rounding_gap(xq.shape[1]) * float(np.linalg.norm(xq, axis=1).max() * np.linalg.norm(xb, axis=1).max())


def _bbs_oracle(index, xq, k, assign):
    """FAISS contrib's big-batch search of the same lists with numpy's float32 scores: the reference."""
    from faiss.contrib.big_batch_search import big_batch_search

    import contextlib
    import io

    index.nprobe = assign.shape[1]
    with contextlib.redirect_stdout(io.StringIO()):  # it reports progress on stdout
        return big_batch_search(
            index,
            xq,
            k,
            method="pairwise_distances",
            q_assign=assign.copy(),
            pairwise_distances=lambda a, b, metric=None: a @ b.T,
        )


@pytest.mark.parametrize("nprobe", [1, 3, 40])
def test_list_major_search_scans_what_big_batch_search_scans(nprobe):
    """The candidates are the probed lists' vectors: FAISS contrib's big_batch_search with the same
    assignment gives the same rows (tie-aware) and scores to float32 rounding; k deeper than a
    query's lists pads with -1."""
    from faiss.contrib.evaluation import check_ref_knn_with_draws

    index, xb, xq = _ivf()
    ivf = ivf_flat_lists(index)
    layout = ListLayout.of(ivf)
    _, assign = coarse_assign(ivf, xq, nprobe, layout.centroids)
    for k in (1, 25, 400):
        D0, I0 = _bbs_oracle(index, xq, k, assign)
        D1, I1 = list_major_search(ivf, xq, k, assign, layout)
        assert D1.shape == (300, k) and I1.dtype == np.int64
        assert ((I1 >= 0) == (I0 >= 0)).all()
        ok = I1 >= 0
        check_ref_knn_with_draws(
            np.where(ok, D0, -1e30), np.where(ok, I0, -1), np.where(ok, D1, -1e30), I1, rtol=0, atol=_order_gap(xq, xb)
        )
        assert (np.diff(np.where(ok, D1, -1e30), axis=1) <= 0).all()


def test_list_major_search_skips_empty_lists():
    """Probed lists that hold no vector (here every odd list) are empty segments of a query's
    collected scores: the rows and ids are still big_batch_search's with the same assignment."""
    import faiss
    from faiss.contrib.evaluation import check_ref_knn_with_draws

    rng = np.random.default_rng(11)
    xb = rng.standard_normal((4000, 16)).astype(np.float32)
    index = faiss.index_factory(16, "IVF20,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    _, first = index.quantizer.search(xb, 1)
    keep = np.flatnonzero(first[:, 0] % 2 == 0)
    index.add_with_ids(xb[keep], keep.astype(np.int64))
    ivf = ivf_flat_lists(index)
    layout = ListLayout.of(ivf)
    assert (layout.sizes[1::2] == 0).all()
    xq = rng.standard_normal((200, 16)).astype(np.float32)
    _, assign = coarse_assign(ivf, xq, 7, layout.centroids)
    for k in (5, 300):
        D0, I0 = _bbs_oracle(index, xq, k, assign)
        D1, I1 = list_major_search(ivf, xq, k, assign, layout)
        assert ((I1 >= 0) == (I0 >= 0)).all() and np.isin(I1[I1 >= 0], keep).all()
        ok = I1 >= 0
        check_ref_knn_with_draws(
            np.where(ok, D0, -1e30), np.where(ok, I0, -1), np.where(ok, D1, -1e30), I1, rtol=0, atol=_order_gap(xq, xb)
        )


def test_list_major_search_is_the_same_on_any_number_of_workers():
    """A pass's lists are split between the workers whole (each list meets every query of the pass
    that probes it in one GEMM), so the scores and rows are the same bits on one worker or several."""
    import faiss

    index, xb, xq = _ivf()
    ivf = ivf_flat_lists(index)
    layout = ListLayout.of(ivf)
    _, assign = coarse_assign(ivf, xq, 12, layout.centroids)
    before = faiss.omp_get_max_threads()
    try:
        got = []
        for threads in (1, 3):
            faiss.omp_set_num_threads(threads)
            got.append(list_major_search(ivf, xq, 60, assign, layout))
    finally:
        faiss.omp_set_num_threads(before)
    assert np.array_equal(got[0][1], got[1][1])
    assert np.array_equal(got[0][0].view(np.uint32), got[1][0].view(np.uint32))
    # in no order (for a caller that sorts them itself): the same scores and rows, sorted as before
    D, I = list_major_search(ivf, xq, 60, assign, layout, ordered=False)
    Ds, Is = topk_desc(D, I, 60)
    assert np.array_equal(Is, got[0][1]) and np.array_equal(Ds.view(np.uint32), got[0][0].view(np.uint32))
    assert not np.array_equal(I, got[0][1])  # the order was left undone


@pytest.mark.parametrize("layout", ["random", "ties", "sample_holds_the_best"])
def test_top_positions_keeps_a_full_partitions_best(layout):
    """The sampled threshold keeps k distinct positions whose scores are the k best (tie-aware: the
    same k-th score and the same multiset of scores as a full partition), also where every sampled
    score is among the best and the threshold leaves fewer than k (the full partition then)."""
    rng = np.random.default_rng(5)
    n = 5000
    seg = rng.standard_normal(n).astype(np.float32)
    if layout == "ties":
        seg = np.round(seg * 4).astype(np.float32)  # a few levels: ties at every cut
    if layout == "sample_holds_the_best":
        seg[:: lists_mod.SAMPLE_STRIDE] += 100
    for k in (1, 7, 100, 599, 1000, n - 1):
        pos = lists_mod.top_positions(seg, k)
        assert pos.size == k and np.unique(pos).size == k
        ref = np.sort(np.partition(seg, n - k)[n - k :])
        assert np.array_equal(np.sort(seg[pos]), ref)


def _probed_exact_top(index, xb, xq, nprobe, k):
    """The contract's reference: every row of each query's probed lists scored exactly, top k."""
    ivf = ivf_flat_lists(index)
    layout = ListLayout.of(ivf)
    _, assign = coarse_assign(ivf, xq, nprobe, layout.centroids)
    rows = [
        np.concatenate([layout.ids[layout.starts[a] : layout.starts[a] + layout.sizes[a]] for a in q if a >= 0])
        for q in assign
    ]
    width = max(len(r) for r in rows)
    R = np.full((len(xq), width), -1, np.int64)
    for i, r in enumerate(rows):
        R[i, : len(r)] = r
    return exact_rescore(xb, xq, R, k)


def test_ivf_flat_rows_are_the_same_in_any_pass_batch_and_kernel(monkeypatch):
    """Chunked == full: the exact top-k among each query's probed lists, bit for bit, in one batch or
    many, with any pass budget, by either candidate kernel; exact twins tie and go to the lower row."""
    index, xb, xq = _ivf(twins=600)
    xq = np.concatenate([xq, xb[:50]])  # queries on a twin pair: a tie at the top
    ref = _probed_exact_top(index, xb, xq, 6, 30)
    for kernels, budget in ((("lists",), 1 << 25), (("lists",), 1), (("faiss",), 1 << 25)):
        monkeypatch.setattr(lists_mod, "LIST_MAJOR_SCORES", budget)
        backend = Reranked(index, xb, 1.0, {"index": "ivf"})
        backend.race = KernelRace(kernels)
        backend.set_params({"nprobe": 6})
        for step in (350, 70, 9, 1):
            parts = [backend.search(xq[s : s + step], 30) for s in range(0, 350, step)]
            D, I = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            assert np.array_equal(I, ref[1]) and np.array_equal(D.view(np.uint32), ref[0].view(np.uint32))
    for q in range(300, 350):  # the twin of row r is row 5400 + r
        pos = np.flatnonzero(ref[1][q] == q - 300)
        assert pos.size == 1 and ref[1][q, pos[0] + 1] == 5400 + q - 300 and ref[0][q, pos[0]] == ref[0][q, pos[0] + 1]


def test_kernels_are_chosen_by_measurement_and_recorded():
    """The first search of a shape runs each kernel on a share of its queries and records the
    seconds per query; later searches of that shape use the faster, with the same rows."""
    index, xb, xq = _ivf()
    backend = Reranked(index, xb, 1.0, {"index": "ivf"})
    backend.set_params({"nprobe": 4})
    D, I = backend.search(xq, 50)
    measured = backend.measured()
    ((shape, per),) = measured["kernels"].items()
    assert set(per) == {"faiss", "lists"} and all(v > 0 for v in per.values())
    assert set(measured["seconds"]) >= {"search", "rerank"}
    assert backend.race.choice(300, 50 + 16) in ("faiss", "lists")
    D2, I2 = backend.search(xq, 50)
    assert np.array_equal(I, I2) and np.array_equal(D, D2)
    assert ivf_flat_lists(build_index(xb, "IVF8,PQ4", device="cpu")) is None  # codes, not vectors


def test_deep_tuning_probes_fewer_lists_than_scaling():
    """Tuned at the reserve and at the deepest depth: the deep value reaches the target there, and
    every search up to that depth probes as many lists (a run mines the shallower depths from rows
    searched that deep); past it, the deep value's ratio."""
    rng = np.random.default_rng(6)
    xb = rng.standard_normal((8000, 16)).astype(np.float32)
    raw = build_index(xb, "IVF64,Flat", device="cpu")
    backend = Reranked(raw, xb, 1.0, {"index": "ivf"})
    xq = rng.standard_normal((200, 16)).astype(np.float32)
    exact = ExactSearch(xb, device="cpu").search(xq, 400)[1]
    tu = tune(backend, exact[:, :50], xq, 50, 0.9)
    deep = tune_deep(backend, exact, xq, 400, 0.9)
    assert deep["depth"] == 400 and deep["reached"] and deep["recall"] >= 0.9
    assert backend.describe()["deep"] == {"depth": 400, "params": {"nprobe": deep["value"]}}
    assert deep["value"] >= tu.value and all(r < 0.9 for _, r, _ in deep["tried"][:-1])
    assert backend.beam_for(400) == backend.beam_for(50) == backend.beam_for(200) == deep["value"]
    assert backend.beam_for(800) == min(64, 2 * deep["value"])
    got = candidate_recall(backend.search(xq, 400)[1], exact)
    assert got == pytest.approx(deep["recall"], abs=1e-4)


def test_recall_read_off_the_lists_is_the_searched_recall():
    """For an IVF-Flat re-ranked exactly, a search at nprobe p returns every exact row whose list is
    among the query's first p probes, so the recall curve from the probe positions equals the
    recall of a search at every p, and tuning picks the smallest p that reaches the target without
    searching."""
    index, xb, xq = _ivf()
    backend = Reranked(index, xb, 1.0, {"index": "ivf"})
    exact = ExactSearch(xb, device="cpu").search(xq, 60)[1]
    pos = probe_positions(backend.lists, backend.layout_of(), xq, exact)
    assert pos.shape == exact.shape and pos.min() >= 0 and pos.max() < 40
    curve = recall_by_nprobe(pos, 40)
    assert curve[0] == 0 and curve[-1] == 1 and (np.diff(curve) >= 0).all()
    for p in (1, 2, 3, 7, 13, 40):
        backend.set_params({"nprobe": p})
        assert candidate_recall(backend.search(xq, 60)[1], exact) == pytest.approx(curve[p], abs=1e-9)
    # the probe order is coarse_assign's over every list (exact scores, ties by the lower list)
    _, order = coarse_assign(backend.lists, xq, 40, backend.layout_of().centroids)
    ref = np.argsort(order, axis=1)  # each list's place in the order
    list_of = np.empty(len(xb), np.int64)
    layout = backend.layout_of()
    list_of[layout.ids] = np.repeat(np.arange(40), layout.sizes)
    assert np.array_equal(pos, np.take_along_axis(ref, list_of[exact], 1))
    tu = tune(backend, exact, xq, 60, 0.9)
    assert tu.method == "lists" and curve[tu.value - 1] < 0.9 <= curve[tu.value] == pytest.approx(tu.recall)
    assert backend.describe()["params"] == {"nprobe": tu.value} and tu.tried[-1][0] == tu.value
    # compressed codes (over-fetch > 1) are tuned by searching
    fetched = Reranked(index, xb, 2.0, {"index": "ivf"})
    assert not by_lists(fetched) and tune(fetched, exact, xq, 60, 0.9).method == "search"


def test_topk_desc_sorts_like_a_two_key_lexsort():
    """Descending score, ties by the lower row, -1 pads last as -inf: the one-sort 64-bit key gives
    the two-key lexsort's rows and bits, with infinities, extreme and subnormal scores and -0.0."""
    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 1.5, -1.5, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, -1e-45, 0.25], np.float32)
    for _ in range(300):
        r, c = rng.integers(1, 6), rng.integers(1, 40)
        D = np.where(rng.random((r, c)) < 0.5, rng.choice(special, (r, c)), rng.standard_normal((r, c))).astype(
            np.float32
        )
        I = rng.integers(-1, 1000, (r, c))
        k = int(rng.integers(1, c + 1))
        order = np.lexsort((np.where(I >= 0, I, np.iinfo(np.int64).max), np.where(I >= 0, -D, np.inf)), axis=1)[:, :k]
        ref_I = np.take_along_axis(I, order, 1)
        ref_D = np.where(ref_I >= 0, np.take_along_axis(D, order, 1) + np.float32(0), -np.inf).astype(np.float32)
        got_D, got_I = topk_desc(D, I, k)
        assert np.array_equal(got_I, ref_I) and np.array_equal(got_D.view(np.uint32), ref_D.view(np.uint32))
    big = np.array([[1.0, 2.0, 2.0]], np.float32), np.array([[1 << 40, 5, 1 << 33]])
    assert topk_desc(*big, 3)[1].tolist() == [[5, 1 << 33, 1 << 40]]  # rows past 2**32: the lexsort


def test_topk_desc_in_parts_equals_one_sort(monkeypatch):
    """A large matrix sorted in parts of its rows on several threads gives the one-thread result."""
    from cir_mine.miner.core.search import topk

    rng = np.random.default_rng(8)
    D = np.round(rng.standard_normal((1100, 90)), 2).astype(np.float32)  # many ties
    I = rng.integers(-1, 5000, D.shape)
    one = topk_desc(D, I, 70)
    monkeypatch.setattr(topk, "PARALLEL_SCORES", 1000)
    monkeypatch.setattr(topk, "usable_cores", lambda: 3)
    seen = []
    part = topk._topk_desc
    monkeypatch.setattr(topk, "_topk_desc", lambda d, i, k: seen.append(len(d)) or part(d, i, k))
    got = topk_desc(D, I, 70)
    assert sorted(seen) == [366, 367, 367]
    assert np.array_equal(got[0].view(np.uint32), one[0].view(np.uint32)) and np.array_equal(got[1], one[1])


def test_max_row_norm_bounds_the_largest_norm_tightly(tmp_path):
    """The float32 sum, inflated by its rounding bound, is never below the float64 norm and within
    a few float32 units of it: float32, float16, float64, memory-mapped, and squares past float32."""
    from cir_mine.miner.core.search.exact import max_row_norm

    rng = np.random.default_rng(11)
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float32, (3000, 64))
    mapped[:] = rng.standard_normal((3000, 64))
    cases = [
        rng.standard_normal((2000, 257)).astype(np.float32),
        (rng.standard_normal((500, 16)) * 3).astype(np.float16),
        rng.standard_normal((300, 8)),
        mapped,
        np.full((4, 8), 3e19, np.float32),  # float32 squares overflow: summed in float64
        np.zeros((0, 8), np.float32),
    ]
    for x in cases:
        exact = float(np.sqrt((np.asarray(x, np.float64) ** 2).sum(1).max(initial=0.0)))
        got = max_row_norm(x, block_rows=700)
        assert exact <= got <= exact * (1 + 1e-4) + 1e-30, (x.dtype, x.shape, got, exact)


def _mapped(path) -> bool:
    """Whether this process maps ``path`` (Linux's /proc/self/maps)."""
    return any(line.rstrip().endswith(str(path)) for line in open("/proc/self/maps"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_a_saved_index_is_mapped_and_a_truncated_one_read_whole(tmp_path):
    """An index file of the size its metadata recorded opens mapped (its lists not copied into
    memory), searches as the index read whole does and survives a rebuild by rename; a truncated
    file, or one saved without a size, is read whole, so truncation is refused with the fix."""
    from cir_mine.miner.core.search.persist import index_meta, load_index, save_index

    index, xb, xq = _ivf(n=3000, d=16, nlist=12)
    path = tmp_path / "index.train.faiss"
    save_index(index, path, {"factory": "IVF12,Flat"})
    assert index_meta(path)["bytes"] == path.stat().st_size and index_meta(path)["factory"] == "IVF12,Flat"
    want = index.search(xq, 20)
    got = load_index(path, "cpu")
    assert _mapped(path)
    assert np.array_equal(got.search(xq, 20)[1], want[1]) and ivf_flat_lists(got) is not None
    other, _, _ = _ivf(n=500, d=16, nlist=4, seed=9)
    save_index(other, path, {"factory": "IVF4,Flat"})  # the rebuild replaces the file by rename
    assert np.array_equal(got.search(xq, 20)[1], want[1])
    del got
    save_index(index, path, {"factory": "IVF12,Flat"})
    full = path.read_bytes()
    path.write_bytes(full[:-5])  # cut short in place: the size no longer matches
    with pytest.raises(DataError, match="not a readable FAISS index .*Rebuild it with `cir-mine index"):
        load_index(path, "cpu")
    path.write_bytes(full)
    path.with_name(path.name + ".json").write_text("{}")  # no recorded size: read whole
    plain = load_index(path, "cpu")
    assert not _mapped(path) and np.array_equal(plain.search(xq, 20)[1], want[1])
    del plain
    checked = load_index(path, "cpu", verified=True)  # its SHA-256 checked by the caller: mapped
    assert _mapped(path) and checked.ntotal == 3000
