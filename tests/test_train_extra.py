"""cir-train --extra-triplets / --extra-weight generated triplets as training queries."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cir_mine.cli import mine_app, train_app
from cir_mine.data.workspace import Workspace, read_triplets, triplets_table
from cir_mine.train.loop import TrainConfig, Trainer
from cir_mine.train.loss import info_nce, triplet_margin

runner = CliRunner()


@pytest.fixture(scope="module")
def extra(synth_work, tmp_path_factory):
    """Generated triplets from `cir-mine positives` on the synthetic workspace."""
    out = tmp_path_factory.mktemp("extra") / "extra.parquet"
    r = runner.invoke(
        mine_app, ["positives", "--work", str(synth_work), "--out", str(out), "--per-image", "1", "--max-images", "300"]
    )
    assert r.exit_code == 0, r.output
    return out


def rewrite(src, dst, **changes):
    """Copy a triplets table with columns replaced (query_id / ref_id / text_embedding)."""
    t = read_triplets(src)
    cols = dict(
        query_ids=t.query_ids,
        categories=t.categories,
        ref_ids=t.ref_ids,
        target_ids=t.target_ids,
        captions=t.captions,
        text_embeddings=t.text_embeddings,
    )
    cols.update(changes)
    pq.write_table(
        triplets_table(**{k: list(v) if k != "text_embeddings" else v for k, v in cols.items()}, source=list(t.source)),
        dst,
    )
    return dst


def trainer(synth_work, tmp_path, **kw):
    cfg = TrainConfig(
        work=str(synth_work), out=str(tmp_path / "run"), epochs=1, batch_size=64, width=0.5, threads=1, **kw
    )
    return Trainer(cfg.validate())


def test_extra_queries_join_training_only(synth_work, extra, tmp_path):
    n_extra = len(read_triplets(extra))
    base = trainer(synth_work, tmp_path)
    t = trainer(synth_work, tmp_path, extra_triplets=[str(extra)], extra_weight=0.25)
    assert len(t.queries) == len(base.queries) + n_extra
    # the dev split is the same queries with or without generated triplets, and holds none of them
    assert t.eval_triplets.query_ids.tolist() == base.eval_triplets.query_ids.tolist()
    assert not set(t.eval_triplets.query_ids.tolist()) & set(read_triplets(extra).query_ids.tolist())
    # the workspace's training queries come first with weight 1, the generated ones after with the weight
    assert t.queries.query_ids[: len(base.queries)].tolist() == base.queries.query_ids.tolist()
    assert base.queries.weights is None
    w = t.queries.weights
    assert np.all(w[: len(base.queries)] == 1.0) and np.all(w[len(base.queries) :] == 0.25)
    # references and targets resolve to the gallery rows of their ids
    g = t.gallery
    assert g.image_ids[t.queries.ref_rows[-n_extra:]].tolist() == read_triplets(extra).ref_ids.tolist()
    assert g.image_ids[t.queries.target_rows[-n_extra:]].tolist() == read_triplets(extra).target_ids.tolist()


def test_weights_scale_each_querys_loss():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    t = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    keys = torch.arange(6)
    pos = keys.unsqueeze(1)
    w = torch.tensor([1.0, 1.0, 0.0, 0.5, 2.0, 1.0])
    plain = info_nce(q, t, keys, pos)
    assert torch.allclose(info_nce(q, t, keys, pos, weights=torch.ones(6)), plain)
    logits = (q @ t.T) / 0.05
    ce = torch.nn.functional.cross_entropy(logits, torch.arange(6), reduction="none")
    assert torch.allclose(info_nce(q, t, keys, pos, weights=w), (ce * w).mean())
    assert not torch.allclose(info_nce(q, t, keys, pos, weights=w), plain)
    neg = torch.nn.functional.normalize(torch.randn(6, 3, 8), dim=2)
    valid = torch.ones(6, 3, dtype=torch.bool)
    hinge = torch.relu(0.2 + (1 - (q * t).sum(-1, keepdim=True)) - (1 - torch.einsum("bd,bkd->bk", q, neg)))
    assert torch.allclose(triplet_margin(q, t, neg, valid, 0.2, w), (hinge * w[:, None]).sum() / 18)


def test_validation_errors(synth_work, extra, tmp_path):
    g, tr = Workspace(synth_work).load("train")
    ex = read_triplets(extra)
    base = ["--work", str(synth_work), "--epochs", "1", "--batch-size", "64", "--width", "0.5", "-q"]

    def run(*files, name="x", weight=None):
        args = base + ["--out", str(tmp_path / name)] + [a for f in files for a in ("--extra-triplets", str(f))]
        return runner.invoke(train_app, args + (["--extra-weight", str(weight)] if weight is not None else []))

    taken = tr.query_ids[0]  # a workspace query (dev or train alike)
    bad = rewrite(extra, tmp_path / "clash.parquet", query_ids=[taken] + list(ex.query_ids[1:]))
    r = run(bad, name="a")
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {bad}: query id '{taken}' is already a training query (of the workspace or an earlier "
        f"--extra-triplets file). Query ids must be unique; regenerate or rename them."
    )
    r = run(extra, extra, name="b")
    assert r.exit_code == 1 and r.output.strip().startswith(f"Error: {extra}: query id '{ex.query_ids[0]}' is already")
    bad = rewrite(extra, tmp_path / "ref.parquet", ref_ids=["nope"] + list(ex.ref_ids[1:]))
    r = run(bad, name="c")
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {bad}: reference id 'nope' of query '{ex.query_ids[0]}' is not in the gallery {g.path}. "
        f"Generate the triplets from this workspace (cir-mine positives --work WORK)."
    )
    emb = np.zeros((len(ex), 16), dtype=np.float32)
    emb[:, 0] = 1
    bad = rewrite(extra, tmp_path / "dim.parquet", text_embeddings=emb)
    r = run(bad, name="d")
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {bad}: column 'text_embedding' has dimension 16 but the gallery has dimension {g.dim}. "
        f"Both must come from the same encoder; re-embed one of them."
    )
    r = run(extra, name="e", weight=-1)
    assert r.exit_code == 2 and r.output.strip() == "Error: --extra-weight -1.0: must be >= 0."


def test_cli_train_with_generated_positives(synth_work, extra, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(
        train_app,
        [
            "--work",
            str(synth_work),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--width",
            "0.5",
            "--extra-triplets",
            str(extra),
            "--extra-weight",
            "0.5",
            "--category-batches",
            "--threads",
            "1",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_extra_queries"] == len(read_triplets(extra)) > 0
    assert m["config"]["extra_triplets"] == [str(extra)] and m["config"]["extra_weight"] == 0.5
    r = runner.invoke(train_app, ["--resume", str(out), "-q"])  # the config carries the extra tables
    assert r.exit_code == 0, r.output
