"""Query embeddings are named by query id, not by position: mine_negatives, Remine and
`cir-mine negatives --query-ids` put rows in the workspace's order and refuse unknown, repeated or
missing ids; Remine takes every table form; an empty round warns; hints speak the API's names."""

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cir_mine import DataError, MineConfig, Remine, UsageError, Workspace, mine_negatives, read_negatives
from cir_mine.cli import mine_app
from cir_mine.data.errors import spell_calls
from cir_mine.data.synthetic import SynthConfig, generate
from cir_mine.miner.core.mine import mine_to_file

runner = CliRunner()
CFG = MineConfig(strategy="hardest", k=4, query="checkpoint", device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("ids")
    generate(SynthConfig(n_gallery=400, n_triplets=60, dim=16, seed=3), out)
    ws = Workspace(out)
    g, t = ws.load("train")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((len(t), g.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return ws, t, q, rng.permutation(len(t))


def test_rows_named_by_id_give_the_table_of_rows_in_order(world, tmp_path):
    ws, t, q, perm = world
    ids = t.query_ids[perm]
    ordered = mine_negatives(ws, "train", CFG, query_emb=q)
    named = mine_negatives(ws, "train", CFG, query_emb=q[perm], query_ids=ids)
    assert named.table.equals(ordered.table)
    # unnamed, a batch in another order has the right shape and mines other queries' negatives
    assert not mine_negatives(ws, "train", CFG, query_emb=q[perm]).table.equals(ordered.table)
    hook = Remine(ws, "train", cfg=CFG)
    assert (
        hook(q[perm], query_ids=list(ids)).table.drop_columns(["round"]).equals(ordered.table.drop_columns(["round"]))
    )


def test_unknown_repeated_and_missing_ids_are_refused(world):
    ws, t, q, perm = world
    ids = list(t.query_ids)
    cases = [
        (
            ids[:-1] + ["nope"],
            "query_emb: 1 query id(s) are not queries of the split (first: nope); the split has 60 "
            f"queries, e.g. {ids[0]}.",
        ),
        (ids[:-1] + [ids[0]], f"query_emb: query id {ids[0]} is given 2 times; give each query once."),
        (ids[:-1], "query_emb: 60 rows but 59 query ids; give one id per row."),
        (
            ids[:-1] + [None],
            "query_emb: query_ids[59] is None (an item without a query, e.g. a FashionIQ entry whose "
            "captions are all empty); leave its row out.",
        ),
    ]
    for given, text in cases:
        with pytest.raises(DataError) as e:
            mine_negatives(ws, "train", CFG, query_emb=q, query_ids=given)
        assert str(e.value) == text
    with pytest.raises(DataError) as e:
        mine_negatives(ws, "train", CFG, query_emb=q[:-1], query_ids=ids[:-1])
    assert str(e.value) == (
        f"query_emb: 1 of the split's 60 queries are missing (first: {ids[-1]}); give a row for "
        f"every query of the split."
    )


def test_cli_query_ids(world, tmp_path):
    ws, t, q, perm = world
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "p.npy", q[perm])
    (tmp_path / "ids.txt").write_text("\n".join(t.query_ids[perm]) + "\n")
    (tmp_path / "bad.txt").write_text("\n".join(list(t.query_ids[perm][:-1]) + ["nope"]) + "\n")

    def mine(out, *extra):
        return runner.invoke(
            mine_app,
            [
                "negatives",
                "--work",
                str(ws.root),
                "--strategy",
                "hardest",
                "-k",
                "4",
                "--device",
                "cpu",
                "-q",
                "--out",
                str(tmp_path / out),
                *extra,
            ],
        )

    assert mine("a.parquet", "--query-emb", str(tmp_path / "q.npy")).exit_code == 0
    r = mine("b.parquet", "--query-emb", str(tmp_path / "p.npy"), "--query-ids", str(tmp_path / "ids.txt"))
    assert r.exit_code == 0, r.output
    assert read_negatives(tmp_path / "b.parquet").table.equals(read_negatives(tmp_path / "a.parquet").table)
    r = mine("c.parquet", "--query-emb", str(tmp_path / "p.npy"), "--query-ids", str(tmp_path / "bad.txt"))
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {tmp_path / 'p.npy'}: 1 query id(s) are not queries of the split (first: nope); the split has 60 "
        f"queries, e.g. {t.query_ids[0]}."
    )
    r = mine("d.parquet", "--query-ids", str(tmp_path / "ids.txt"))
    assert (
        r.exit_code == 2
        and r.output.strip() == "Error: --query-ids names the rows of --query-emb; pass --query-emb too."
    )
    assert not (tmp_path / "c.parquet").exists() and not (tmp_path / "d.parquet").exists()


def test_remine_takes_every_table_form(world, tmp_path):
    from cir_mine import group_negatives_table
    from cir_mine.miner.core.tables import read_negatives as read

    ws, t, q, perm = world
    path = tmp_path / "n.parquet"
    res = mine_to_file(ws, "train", MineConfig(strategy="hardest", k=4, device="cpu"), path)
    want = Remine(ws, negatives=path)(q).table
    for form in (res, read(path), read(path, ws), pq.read_table(path)):
        assert Remine(ws, negatives=form)(q).table.equals(want), type(form)
    with pytest.raises(UsageError) as e:
        Remine(ws, negatives=group_negatives_table(res.table))
    assert str(e.value) == (
        "Remine takes the negatives table (a path, read_negatives(...), a MineResult or a pyarrow "
        "Table), not its grouped form: it regroups it over the split's queries."
    )
    with pytest.raises(UsageError) as e:
        Remine(ws, negatives=res.table)
    assert str(e.value) == (
        "Remine: the negatives table given has no footer to read the mining config from (a bare "
        "pyarrow Table); pass cfg=MineConfig(...) instead."
    )


def test_an_empty_round_warns(world, caplog):
    ws, t, q, perm = world
    g, _ = ws.load("train")
    away = -g.embeddings[g.rows(t.target_ids.tolist(), t.categories.tolist())]  # s(q, t) = -1: the cap takes all
    hook = Remine(ws, "train", cfg=MineConfig(strategy="hardest", k=4, device="cpu"))
    with caplog.at_level(logging.WARNING, logger="cir_mine"):
        res = hook(away)
    assert res.table.num_rows == 0
    hints = res.meta["shortfall"]["hints"]
    assert hints[0].startswith("the positive-aware cap removed ") and "MineConfig.of(rho=...)" in hints[0]
    text = (
        f"re-mining round 1 (epoch 0) gave no negatives to any of the 60 queries: this round trains on in-batch "
        f"negatives only; to loosen: {'; '.join(hints)}."
    )
    assert res.meta["warnings"] == [text]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [text]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cir_mine"):
        assert "warnings" not in hook(q).meta
    assert not caplog.records


def test_hints_name_api_parameters_and_the_cli_spells_flags():
    from cir_mine.cli import NEGATIVES_FLAGS, flag
    import functools

    spell = functools.partial(flag, flags=NEGATIVES_FLAGS)
    text = (
        "loosen MineConfig.of(rho=...) or switch it off, MineConfig.of(rho=None); widen "
        "MineConfig.of(delta_lo=..., delta_hi=...); lower MineConfig.of(k=...); MineConfig.of(max_candidates=None)"
    )
    assert spell_calls(text, spell) == (
        "loosen --rho or switch it off, --no-guard cap; widen --delta-lo/--delta-hi; lower -k; --no-deepen"
    )
    from cir_mine.miner.core.strategies import REGISTRY

    for name, s in REGISTRY.items():
        assert "--" not in s.hint, name  # flags are the CLI's words, not the library's
