"""Readers see one version of the data (docs/reliability.md, "Readers and concurrent writers").

A split rewritten while it is read or mined never yields a table stamped with a hash of data it did
not read: ``Workspace.load`` hashes the split before and after reading it, mining checks it again
before the footer is written, and ``stats`` checks it after its numbers are computed.
"""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import DataError
from cir_mine.data.synthetic import SynthConfig, generate
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.mine import MineConfig, mine_to_file
from cir_mine.miner.core.tables import read_negatives, write_negatives

runner = CliRunner()
CFG = MineConfig(strategy="midzone", k=4, query_batch=8)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=3), root / "W")
    return root


@pytest.fixture
def work(worlds, tmp_path):
    shutil.copytree(worlds / "W", tmp_path / "W")
    return tmp_path / "W"


def rewrite(work: Path) -> None:
    """Another writer replaces the split (another synthetic world, same shape)."""
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=4), work, overwrite=True)


def changed(work: Path, while_: str) -> str:
    return (
        f"{work}: split 'train' changed while it was {while_} (another process rewrote gallery.train.parquet or "
        f"triplets.train.parquet). Run the command again once that writer is done."
    )


def test_a_split_rewritten_while_mining_gives_no_table(work, tmp_path):
    """The split is replaced after the first batch: no table (it would carry a hash of data it did not read)."""
    out = tmp_path / "o" / "n.parquet"
    calls = []

    def progress(n):
        if not calls:
            rewrite(work)
        calls.append(n)

    with pytest.raises(DataError) as e:
        mine_to_file(Workspace(work), "train", CFG, out, progress=progress)
    assert str(e.value) == changed(work, "mined") and len(calls) > 1
    assert not out.parent.exists()
    # the same run on the rewritten split is stamped with that split's hash, and stats accepts it
    res = mine_to_file(Workspace(work), "train", CFG, out)
    assert res.meta["data_hash"] == Workspace(work).split_hash("train")
    r = runner.invoke(mine_app, ["stats", str(out), "--work", str(work)])
    assert r.exit_code == 0, r.output


def rewrite_before(monkeypatch, work: Path, method: str):
    """Another writer replaces the split each time ``Workspace.<method>`` is called, just before it
    runs; -> the real method."""
    real = getattr(Workspace, method)

    def rewritten(self, split, *a, **kw):
        rewrite(work)
        return real(self, split, *a, **kw)

    monkeypatch.setattr(Workspace, method, rewritten)
    return real


def test_a_split_rewritten_while_it_is_read_is_refused(work, monkeypatch):
    """Between the gallery and the triplets another writer replaces the split: the load fails, naming it."""
    rewrite_before(monkeypatch, work, "triplets")
    with pytest.raises(DataError) as e:
        Workspace(work).load("train")
    assert str(e.value) == changed(work, "read")


@pytest.mark.parametrize("open_to_hash", [64, 0])
def test_a_split_rewritten_after_it_is_opened_to_hash_is_refused(work, monkeypatch, open_to_hash):
    """The split's files are hashed on a thread beside the reads, from handles opened before them (or,
    past OPEN_TO_HASH files, hashed first): a writer that replaces the split before the gallery is
    read makes the load fail, whichever file the hash saw."""
    import cir_mine.data.digest as digest

    monkeypatch.setattr(digest, "OPEN_TO_HASH", open_to_hash)
    real = rewrite_before(monkeypatch, work, "gallery")
    with pytest.raises(DataError) as e:
        Workspace(work).load("train")
    assert str(e.value) == changed(work, "read")
    monkeypatch.setattr(Workspace, "gallery", real)
    g, _ = Workspace(work).load("train")  # the rewritten split, read whole, carries its own hash
    assert g.data_hash == Workspace(work).split_hash("train")


def test_stats_over_a_split_rewritten_while_it_counts_is_refused(work, tmp_path, monkeypatch):
    out = tmp_path / "n.parquet"
    mine_to_file(Workspace(work), "train", CFG, out)
    import cir_mine.miner.inspection.stats as stats

    real = stats.stats_of

    def stats_of(*a, **kw):
        rewrite(work)
        return real(*a, **kw)

    monkeypatch.setattr(stats, "stats_of", stats_of)
    r = runner.invoke(mine_app, ["stats", str(out), "--work", str(work)])
    assert r.exit_code == 1 and r.output.strip() == f"Error: {changed(work, 'read')}", r.output


def test_a_table_replaced_while_it_is_read_gives_rows_and_footer_of_one_version(work, tmp_path, monkeypatch):
    """The footer and the rows of a negatives table come from one read of one file."""
    path = tmp_path / "n.parquet"
    a = mine_to_file(Workspace(work), "train", CFG, path)
    b = mine_to_file(Workspace(work), "train", MineConfig(strategy="random", k=2), tmp_path / "b.parquet")
    import cir_mine.miner.core.tables as tables

    real = tables.read_parquet

    def read_parquet(p, *args, **kw):  # another writer replaces the table just before its rows are read
        write_negatives(b.table, path, b.meta)
        return real(p, *args, **kw)

    monkeypatch.setattr(tables, "read_parquet", read_parquet)
    nt = read_negatives(path)
    assert nt.meta["n_rows"] == nt.table.num_rows == b.table.num_rows != a.table.num_rows
    assert nt.meta["config"]["strategy"] == "random"
