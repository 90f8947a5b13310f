"""--engine ray on a local Ray cluster (2 CPUs, started and stopped here): shard actors give the
single-process table (flat), IVF-PQ shards keep the hardest negatives, a killed actor is retried."""

import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.crash import CRASH_ENV
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.mine import MineConfig, mine_negatives
from cir_mine.miner.core.tables import read_negatives
from cir_mine.miner.distributed.mine import mine_with_engine
from cir_mine.miner.distributed.ray_shards import RayConfig
from cir_mine.miner.distributed.shards import ShardConfig

ray = pytest.importorskip("ray")
runner = CliRunner()
pytestmark = pytest.mark.slow  # a local Ray cluster and shard actors
RAY_CFG = RayConfig(cpus_per_shard=0.5)  # three shard actors fit on the 2-CPU test cluster


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _pairs(t):
    return set(zip(t["query_id"].to_pylist(), t["neg_id"].to_pylist()))


def test_flat_shards_on_ray_equal_the_single_process_table(cluster, synth_work):
    ws = Workspace(synth_work)
    cfg = MineConfig(mix="hardest:0.5,category-discrepant:0.3,random:0.2", k=10, seed=2)
    one = mine_negatives(ws, "train", cfg)
    res = mine_with_engine(ws, "train", cfg, "ray", ShardConfig(shards=3), RAY_CFG)
    assert res.table.equals(one.table)
    assert res.meta["engine"]["name"] == "ray" and res.meta["engine"]["index"]["shards"] == 3


def test_ivfpq_shards_on_ray_keep_the_hardest_negatives(cluster, synth_work):
    ws = Workspace(synth_work)
    cfg = MineConfig(strategy="hardest", k=10)
    exact = _pairs(mine_negatives(ws, "train", cfg).table)
    res = mine_with_engine(ws, "train", cfg, "ray", ShardConfig(shards=3, index="ivfpq", nprobe=8), RAY_CFG)
    assert len(exact & _pairs(res.table)) / len(exact) >= 0.99
    meta = res.meta["engine"]["index"]
    assert meta["factory"].startswith("IVF") and "PQ" in meta["factory"] and meta["nprobe"] == 8


def test_killed_shard_actor_is_restarted_and_the_table_is_identical(cluster, synth_work, tmp_path, monkeypatch):
    ws = Workspace(synth_work)
    cfg = MineConfig(strategy="hardest", k=10)
    one = mine_negatives(ws, "train", cfg)
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ENV, f"shard-search-1:EXIT@{marker}")  # once: the restarted actor carries on
    res = mine_with_engine(ws, "train", cfg, "ray", ShardConfig(shards=2), RAY_CFG)
    assert marker.exists()  # the actor of shard 1 did exit mid-run
    assert res.table.equals(one.table)


def test_cli_engine_ray_joins_the_cluster_and_writes_the_same_table(cluster, synth_work, tmp_path):
    """A second process joins the test cluster with --ray-address HOST:PORT; same table as local."""
    import os
    import subprocess
    import sys

    base = ["negatives", "--work", str(synth_work), "--strategy", "hardest", "-k", "5", "-q"]
    r = runner.invoke(mine_app, base + ["--out", str(tmp_path / "one.parquet")])
    assert r.exit_code == 0, r.output
    address = cluster.get_runtime_context().gcs_address
    code = (
        "import sys\nfrom cir_mine.cli import mine_main\n"
        f"sys.argv = ['cir-mine', *{base!r}, '--out', {str(tmp_path / 'ray.parquet')!r}, '--engine', 'ray',"
        f" '--shards', '2', '--cpus-per-shard', '0.5', '--ray-address', {address!r}]\nmine_main()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert p.returncode == 0, p.stderr[-2000:]
    one, sharded = (read_negatives(tmp_path / f, Workspace(synth_work)) for f in ("one.parquet", "ray.parquet"))
    assert sharded.table.equals(one.table)
    assert sharded.meta["engine"]["shard"]["shards"] == 2 and sharded.meta["engine"]["name"] == "ray"
