"""Ray never hangs (docs/reliability.md, "Ray"): shards the cluster cannot place get fractional CPUs or a
clear error naming --cpus-per-shard; an address that does not answer fails within a stated timeout;
``-q`` silences Ray's own logging."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cir_mine.data.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def cli(args, timeout=240):
    return subprocess.run(
        [sys.executable, "-c", "from cli import mine_main; mine_main()", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_shards_get_the_cpus_the_cluster_has():
    from cir_mine.miner.distributed.ray_shards import shard_cpus

    assert shard_cpus(2, None, 2.0) == 1.0 and shard_cpus(4, None, 2.0) == 0.5
    assert shard_cpus(3, None, 2.0) == 0.6666  # 3 x 0.6666 <= 2: Ray can place them
    assert shard_cpus(4, 0.25, 2.0) == 0.25
    with pytest.raises(UsageError) as e:
        shard_cpus(4, 1.0, 2.0)
    assert str(e.value) == (
        "cpus_per_shard 1: shards 4 x cpus_per_shard 1 = 4 CPUs, but the Ray cluster has 2, so the "
        "actors could never all start. Pass cpus_per_shard 0.5 or less, or lower shards."
    )
    assert e.value.params == ("cpus_per_shard", "shards")


def test_an_address_that_does_not_answer_fails_within_the_timeout():
    pytest.importorskip("ray")
    from cir_mine.miner.distributed.ray_shards import connect

    with socket.socket() as silent:  # accepts connections, never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(UsageError) as e:
            connect(f"127.0.0.1:{port}", timeout=0.5)
    assert str(e.value) == (
        f"ray_address 127.0.0.1:{port}: no Ray cluster answers at 127.0.0.1:{port} (no answer "
        f"within 0.5 s). Start one with `ray start --head` and pass the address it prints, or "
        f"omit ray_address for a local cluster."
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from cir_mine.data.synthetic import SynthConfig, generate

    root = tmp_path_factory.mktemp("ray-limits")
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=3), root / "W")
    return root / "W"


@pytest.mark.slow
def test_an_unreachable_address_fails_at_once_on_the_command_line(work, tmp_path):
    pytest.importorskip("ray")
    r = cli(
        [
            "negatives",
            "--work",
            work,
            "--out",
            tmp_path / "o" / "n.parquet",
            "--strategy",
            "hardest",
            "-k",
            "4",
            "--engine",
            "ray",
            "--ray-address",
            "127.0.0.1:1",
            "-q",
        ],
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "Error: --ray-address 127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1 (Connection "
        "refused). Start one with `ray start --head` and pass the address it prints, or omit "
        "--ray-address for a local cluster."
    ), r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_more_shards_than_cpus_run_quietly_or_fail_naming_the_option(work, tmp_path):
    """On a local cluster of this machine's CPUs: twice as many shards as CPUs mine with fractional CPUs
    (and -q leaves stderr empty: no Ray log line); asking 1 CPU each is refused at once."""
    pytest.importorskip("ray")
    cpus = os.cpu_count() or 1
    shards = 2 * cpus
    args = [
        "negatives",
        "--work",
        work,
        "--strategy",
        "hardest",
        "-k",
        "4",
        "--engine",
        "ray",
        "--shards",
        shards,
        "-q",
    ]
    r = cli([*args, "--out", tmp_path / "a.parquet"])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = cli([*args, "--out", tmp_path / "b.parquet", "--cpus-per-shard", "1"])
    fit = int(cpus / shards * 10_000) / 10_000
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        f"Error: --cpus-per-shard 1: --shards {shards} x --cpus-per-shard 1 = {shards} CPUs, but "
        f"the Ray cluster has {cpus}, so the actors could never all start. Pass "
        f"--cpus-per-shard {fit:g} or less, or lower --shards."
    ), r.stderr
    assert not (tmp_path / "b.parquet").exists()


@pytest.mark.slow
def test_sigterm_after_ray_started_still_rolls_back(work, tmp_path):
    """ray.init installs its own SIGTERM handler (exit at once); the write job's comes back after it."""
    pytest.importorskip("ray")
    out = tmp_path / "o" / "n.parquet"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cli import mine_main; mine_main()",
            "negatives",
            "--work",
            str(work),
            "--out",
            str(out),
            "--strategy",
            "hardest",
            "-k",
            "4",
            "--engine",
            "ray",
            "--shards",
            "2",
            "-q",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CIR_MINE_CRASH": "n.parquet:TERM"},
    )
    assert r.returncode == 143, r.stderr
    assert r.stderr.strip() == "Error: interrupted (SIGTERM); nothing was changed.", r.stderr
    assert not out.parent.exists()
