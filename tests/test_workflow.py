"""The workflow a new user walks through: splits, image paths, checks, hints, imports, options."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import DataError
from cir_mine.data.synthetic import SynthConfig, generate
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.mine import MineConfig, mine_to_file
from cir_mine.miner.core.tables import read_negatives

runner = CliRunner()


def _world(root: Path, seed: int = 0, split: str = "train", n_gallery: int = 300, n_triplets: int = 40) -> Path:
    generate(SynthConfig(n_gallery=n_gallery, n_triplets=n_triplets, dim=16, seed=seed, split=split), root)
    return root


# ------------------------------------------------------------------------------------------------
# A negatives table belongs to its split


def test_a_table_survives_embedding_another_split(tmp_path):
    work = _world(tmp_path / "w")
    negs = tmp_path / "n.parquet"
    mine_to_file(Workspace(work), "train", MineConfig(strategy="midzone", k=4), negs)
    before = Workspace(work).manifest_hash()
    _world(work, seed=3, split="val", n_gallery=200)               # a val split lands in the workspace
    assert Workspace(work).manifest_hash() != before               # the manifest moved on ...
    assert read_negatives(negs, Workspace(work)).table.num_rows > 0  # ... the train table still belongs
    r = runner.invoke(mine_app, ["stats", str(negs), "--work", str(work)])
    assert r.exit_code == 0, r.output


def test_a_table_from_other_data_is_still_refused(tmp_path):
    work, other = _world(tmp_path / "w"), _world(tmp_path / "o", seed=5)
    negs = tmp_path / "n.parquet"
    mine_to_file(Workspace(other), "train", MineConfig(strategy="random", k=3), negs)
    theirs, ours = Workspace(other).split_hash("train"), Workspace(work).split_hash("train")
    assert theirs != ours
    r = runner.invoke(mine_app, ["stats", str(negs), "--work", str(work)])
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: {negs}: mined from another workspace (split 'train' data hash {theirs}, "
                                f"{work} has {ours}). Re-mine it with `cir-mine negatives --work {work} --split train`.")
    # the same workspace, its train split written again with other data (same counts)
    _world(other, seed=6)
    with pytest.raises(DataError, match=r"mined from another workspace \(split 'train' data hash"):
        read_negatives(negs, Workspace(other))


def test_a_table_of_a_split_the_workspace_lacks(tmp_path):
    work, other = _world(tmp_path / "w"), _world(tmp_path / "o", split="val")
    negs = tmp_path / "n.parquet"
    mine_to_file(Workspace(other), "val", MineConfig(strategy="random", k=3), negs)
    with pytest.raises(DataError) as e:
        read_negatives(negs, Workspace(work))
    assert str(e.value) == (f"{negs}: mined on split 'val', which {work} does not have (splits: train). "
                            f"Pass the workspace it was mined from with --work.")
