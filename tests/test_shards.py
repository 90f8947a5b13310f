"""Sharded search in process: exact merge of per-shard top-k lists, train-once IVF shards."""

import subprocess
import sys

import numpy as np
import pytest

from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import Workspace, l2_normalize
from cir_mine.miner.core.mine import MineConfig, mine_negatives
from cir_mine.miner.core.search import build_index
from cir_mine.miner.distributed.mine import mine_with_engine
from cir_mine.miner.core.search.topk import merge_topk, topk_desc
from cir_mine.miner.distributed.shards import ShardConfig, ShardedIndex, shard_bounds


def _unit(rng, n, d):
    return l2_normalize(rng.standard_normal((n, d)).astype(np.float32))


def test_shard_bounds_cover_every_row_once():
    for n, s in ((10, 3), (7, 7), (1000, 4)):
        b = shard_bounds(n, s)
        assert b[0] == 0 and b[-1] == n and len(b) == s + 1
        assert np.all(np.diff(b) >= n // s) and np.all(np.diff(b) <= n // s + 1)


def test_merge_equals_one_sorted_list():
    rng = np.random.default_rng(0)
    D = rng.integers(0, 5, (6, 40)).astype(np.float32)  # many ties
    I = np.stack([rng.permutation(40) for _ in range(6)]).astype(np.int64)
    parts = [topk_desc(D[:, a:b], I[:, a:b], 7) for a, b in ((0, 13), (13, 30), (30, 40))]
    Dm, Im = merge_topk(parts, 7)
    for q in range(6):
        ref = sorted(zip(-D[q], I[q]))[:7]  # score desc, lower id first
        assert Im[q].tolist() == [i for _, i in ref] and Dm[q].tolist() == [-d for d, _ in ref]


def test_flat_shards_equal_one_flat_index_with_duplicates():
    """Duplicated gallery vectors tie exactly; the shards order them as the single-process search does (lower row first)."""
    rng = np.random.default_rng(1)
    base = _unit(rng, 60, 16)
    xb = np.concatenate([base, base[:20]])[rng.permutation(80)]
    xq = l2_normalize(base[:30] + 0.05 * rng.standard_normal((30, 16)).astype(np.float32))
    from cir_mine.miner.core.search.backends import ExactSearch

    D, I = ExactSearch(xb, device="cpu").search(xq, 10)
    Ds, Is = ShardedIndex(xb, ShardConfig(shards=3)).search(xq, 10)
    assert np.allclose(D, Ds, rtol=0, atol=1e-6)
    # exact duplicates tie up to the last float bit, so compare the rows as sets (the 10th slot may
    # hold another of a tie)
    assert all(set(a[:9]) == set(b[:9]) for a, b in zip(Is, I))


def test_ivf_shards_share_one_training_and_cover_the_depth():
    rng = np.random.default_rng(2)
    xb, xq = _unit(rng, 4000, 16), _unit(rng, 50, 16)
    idx = ShardedIndex(xb, ShardConfig(shards=4, index="IVF16,Flat", nprobe=8))
    cents = [s.ivf.quantizer.reconstruct_n(0, 16) for s in idx.searchers]
    assert all(np.array_equal(cents[0], c) for c in cents[1:])  # trained once, copied
    D, I = idx.search(xq, 20)
    De, Ie = build_index(xb, "flat", device="cpu").search(xq, 20)
    assert np.all(np.diff(D, axis=1) <= 0)
    assert np.allclose(D, np.einsum("qkd,qd->qk", xb[I], xq), atol=1e-5)  # re-ranked: exact scores
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(I, Ie)])
    assert recall >= 0.9  # uniform random 16-d: the hard case for IVF
    # a deep search visits more lists than nprobe: enough to hold list_cover x the candidates
    s = idx.searchers[0]
    assert (s.probes(20), s.probes(200), s.probes(300)) == (8, 13, 16)  # 1000 rows in 16 lists: 62.5 per list


def test_local_flat_shards_mine_the_single_process_table(synth_work):
    ws = Workspace(synth_work)
    for cfg in (
        MineConfig(strategy="hardest", k=10),
        MineConfig(mix="midzone:0.5,category-discrepant:0.3,random:0.2", k=10, seed=4),
    ):
        one = mine_negatives(ws, "train", cfg)
        sharded = mine_with_engine(ws, "train", cfg, "local", ShardConfig(shards=3))
        assert sharded.table.equals(one.table)
        assert sharded.meta["engine"]["index"]["shards"] == 3


def test_shard_config_errors():
    with pytest.raises(UsageError, match=r"^shards must be at least 1 \(got 0\)\.$"):
        ShardConfig(shards=0).validate(10)
    with pytest.raises(UsageError, match=r"^shards 11 is more than the gallery's 10 rows; use at most 10\.$"):
        ShardConfig(shards=11).validate(10)
    with pytest.raises(UsageError) as e:  # the CLI spells the shard options --shard-*
        ShardConfig(nprobe=0).validate(10)
    assert e.value.render(lambda p: "--" + p.replace("_", "-")).startswith("--shard-nprobe, the over-fetch factor")
    with pytest.raises(UsageError, match="sharded search needs flat or an IVF index"):
        ShardedIndex(_unit(np.random.default_rng(0), 100, 8), ShardConfig(index="HNSW32"))


@pytest.mark.parametrize("command", ["negatives", "embed"])
def test_engine_ray_without_ray_names_the_extra(synth_work, tmp_path, command):
    """Ray blocked at import: one Error line naming the extra, exit 2, nothing written."""
    out = tmp_path / "out"
    args = (
        ["negatives", "--work", str(synth_work), "--strategy", "hardest", "--out", str(out / "n.parquet")]
        if command == "negatives"
        else ["embed", "--dataset", "folder", "--root", str(tmp_path), "--work", str(out)]
    )
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from cir_mine.cli import mine_main\n"
        f"sys.argv = ['cir-mine', *{args!r}, '--engine', 'ray', '-q']\n"
        "mine_main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "Error: --engine ray needs Ray, which is not installed: install the 'ray' extra (pip install 'cir-mine[ray]')."
    )
    assert not out.exists()


def test_refresh_searches_through_the_tables_engine(synth_work, tmp_path, monkeypatch):
    """A table mined through IVF shards is re-mined through the same shards (opened once), not the
    workspace index: each round equals the engine's own mine with the same queries."""
    from cir_mine.miner.distributed import shards as shards_mod
    from cir_mine.miner.core.tables import read_negatives
    from cir_mine.miner.distributed.mine import EngineConfig
    from cir_mine.miner.negatives import mine_file
    from cir_mine.miner.remine import Remine

    ws = Workspace(synth_work)
    sc = ShardConfig(shards=2, index="IVF16,Flat", nprobe=2)
    negs = tmp_path / "negs.parquet"
    mine_file(ws, "train", MineConfig(strategy="hardest", k=3), negs, engine=EngineConfig("local", sc))
    assert read_negatives(negs).meta["engine"]["shard"]["index"] == "IVF16,Flat"
    opened = []
    real_init = shards_mod.ShardedIndex.__init__
    monkeypatch.setattr(
        shards_mod.ShardedIndex, "__init__", lambda self, *a, **k: opened.append(1) or real_init(self, *a, **k)
    )
    remine = Remine(ws, "train", negatives=negs, device="cpu")
    t = ws.triplets("train")
    rng = np.random.default_rng(0)
    for r in (1, 2):
        q = l2_normalize(rng.standard_normal(t.text_embeddings.shape).astype(np.float32))
        res = remine(q, mining_round=r, epoch=r)
        table, meta = res.table, res.meta
        assert meta["engine"]["shard"] == read_negatives(negs).meta["engine"]["shard"]
        cfg = MineConfig.from_dict({**read_negatives(negs).config, "query": "checkpoint"})
        fresh = mine_with_engine(ws, "train", cfg, "local", sc, query_emb=q, mining_round=r).table
        assert table.equals(fresh)
    assert len(opened) == 1 + 2  # the refresh's one index + the two fresh mines


def test_cli_engine_and_shard_errors(synth_work, tmp_path):
    from typer.testing import CliRunner

    from cir_mine.cli import mine_app

    base = ["negatives", "--work", str(synth_work), "--strategy", "hardest", "--out", str(tmp_path / "n.parquet")]
    r = CliRunner().invoke(mine_app, base + ["--engine", "nope"])
    assert r.exit_code == 2 and r.output.strip() == "Error: --engine 'nope': use local or ray."
    r = CliRunner().invoke(mine_app, base + ["--shards", "4000"])
    assert (
        r.exit_code == 2
        and r.output.strip() == "Error: --shards 4000 is more than the gallery's 3000 rows; use at most 3000."
    )
    assert not (tmp_path / "n.parquet").exists()
