"""cir-mine stats / sql: numbers equal a numpy recomputation, views work, overlap exact, errors exact."""

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import DataError
from cir_mine.miner.inspection.stats import OVERLAP_BUCKETS, QUANTILES, format_stats, summarize
from cir_mine.miner.inspection.sql import sql_query
from cir_mine.miner.core.tables import write_negatives
from tests.fixtures import make_negatives

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="session")
def negs(synth_work, tmp_path_factory):
    d = tmp_path_factory.mktemp("negs")
    r = make_negatives(synth_work, d / "random.parquet", k=6, strategy="random", seed=1, drop=4)
    h = make_negatives(synth_work, d / "hardest.parquet", k=6, strategy="hardest", seed=2, mining_round=1)
    return r, h


def test_stats_equal_numpy(negs, synth_work):
    st = summarize(list(negs), synth_work)
    for path, s in zip(negs, st.tables):
        t = {c: np.asarray(v) for c, v in pq.read_table(path).to_pydict().items()}
        delta, n = t["delta"].astype(np.float64), len(t["delta"])
        qids, per_q = np.unique(t["query_id"], return_counts=True)
        assert s.rows == n and s.queries == len(qids)
        assert s.per_query["min"] == per_q.min() and s.per_query["max"] == per_q.max()
        assert s.per_query["mean"] == pytest.approx(per_q.mean()) and s.per_query["median"] == np.median(per_q)
        for q in QUANTILES:
            assert s.delta_quantiles[q] == pytest.approx(np.quantile(delta, q), abs=1e-6)
        counts, edges = np.histogram(delta, bins=len(s.delta_hist[0]))
        np.testing.assert_array_equal(s.delta_hist[0], counts)
        np.testing.assert_allclose(s.delta_hist[1], edges)
        assert s.category_match == pytest.approx(t["category_match"].mean())
        ov = t["attr_overlap"].astype(np.float64)
        assert s.attr_overlap_mean == pytest.approx(ov.mean())
        for lab, lo, hi in OVERLAP_BUCKETS:
            assert s.attr_overlap_mix[lab] == pytest.approx(((ov >= lo) & (ov < hi)).mean())
        names, cnt = np.unique(t["strategy"], return_counts=True)
        assert s.strategies == dict(zip(names.tolist(), cnt.tolist()))
        assert sum(s.neg_categories.values()) == n
    assert st.tables[0].shortfall["count"] == 4 and len(st.tables[0].shortfall["query_ids"]) == 4
    assert st.tables[0].per_query["min"] == 5 and st.tables[1].rounds == [1]
    text = format_stats(st)
    assert "shortfall: 4 queries with fewer than k negatives" in text and "[0] vs [1]:" in text


def _pairs_table(pairs, rnd):
    n = len(pairs)
    return pa.table(
        {
            "query_id": [q for q, _ in pairs],
            "ref_id": ["r"] * n,
            "target_id": ["t"] * n,
            "neg_id": [x for _, x in pairs],
            "neg_category": [""] * n,
            "strategy": ["random"] * n,
            "rank": [-1] * n,
            "score": [0.1] * n,
            "target_score": [0.5] * n,
            "delta": [0.4] * n,
            "round": [rnd] * n,
            "category_match": [False] * n,
            "attr_overlap": [0.0] * n,
            "seed": [0] * n,
        }
    )


def test_round_overlap_exact(tmp_path):
    a = [("q1", "a"), ("q1", "b"), ("q2", "c"), ("q2", "c")]  # one duplicated pair
    b = [("q1", "a"), ("q2", "c"), ("q2", "d"), ("q3", "e"), ("q3", "b")]
    c = [("q9", "z")]
    for name, pairs, rnd in (("a", a, 0), ("b", b, 1), ("c", c, 2)):
        write_negatives(_pairs_table(pairs, rnd), tmp_path / f"{name}.parquet", {"config": {"k": 2}})
    st = summarize([tmp_path / f"{n}.parquet" for n in "abc"])
    # A = {q1a, q1b, q2c}, B = {q1a, q2c, q2d, q3e, q3b}: |A∩B| = 2, |A∪B| = 6
    assert st.overlap[0, 1] == st.overlap[1, 0] == pytest.approx(2 / 6)
    assert st.shared_pairs[0, 1] == 2 and st.overlap[0, 2] == 0.0 and st.overlap[1, 1] == 1.0
    assert "[0] vs [1]: 0.3333  (2 shared)" in format_stats(st)


def test_sql_views(negs, synth_work):
    both = sql_query("SELECT count(*), count(DISTINCT filename) FROM negs", list(negs), synth_work)
    n = sum(pq.read_metadata(p).num_rows for p in negs)
    assert both.rows == [(n, 2)]
    g = sql_query("SELECT count(*) FROM gallery", negs[:1], synth_work).rows[0][0]
    assert g == pq.read_metadata(Path(synth_work) / "gallery.train.parquet").num_rows
    cols = sql_query("SELECT * FROM triplets LIMIT 1", negs[:1], synth_work).columns
    assert "text_embedding" not in cols and "captions" in cols
    # the join the trainer needs: every negative's query exists
    orphan = sql_query(
        "SELECT count(*) FROM negs LEFT JOIN triplets USING (query_id) WHERE triplets.ref_id IS NULL",
        list(negs),
        synth_work,
    )
    assert orphan.rows == [(0,)]
    sim = sql_query(
        "SELECT max(abs(array_cosine_similarity(embedding, embedding) - 1)) FROM gallery_emb", [], synth_work
    )
    assert sim.rows[0][0] < 1e-5


def test_docs_queries_run(negs, synth_work):
    blocks = re.findall(r"```sql\n(.*?)```", (REPO / "docs" / "queries.md").read_text(), re.S)
    assert len(blocks) >= 3
    for sql in blocks:
        res = sql_query(sql, list(negs), synth_work)
        assert res.rows, sql


def test_sql_cli_formats(negs, synth_work):
    q = "SELECT strategy, count(*) AS n FROM negs GROUP BY 1 ORDER BY 1"
    r = runner.invoke(mine_app, ["sql", q, *map(str, negs), "--work", str(synth_work), "--format", "csv"])
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(io.StringIO(r.output)))
    assert rows[0] == ["strategy", "n"] and [x[0] for x in rows[1:]] == ["hardest", "random"]
    r = runner.invoke(mine_app, ["sql", q, *map(str, negs), "--format", "json"])
    assert json.loads(r.output)[0]["strategy"] == "hardest"
    r = runner.invoke(mine_app, ["sql", q, *map(str, negs)])
    assert r.output.splitlines()[0].split() == ["strategy", "n"] and r.output.endswith("(2 rows)\n")


def test_stats_cli(negs, synth_work):
    r = runner.invoke(mine_app, ["stats", *map(str, negs), "--work", str(synth_work)])
    assert r.exit_code == 0, r.output
    assert "delta histogram (20 bins):" in r.output and "negative categories:" in r.output


def test_sql_errors_exact(negs, synth_work, tmp_path):
    r = runner.invoke(mine_app, ["sql", "SELEC 1", str(negs[0])])
    assert r.exit_code == 1
    assert r.output.strip() == (
        'Error: SQL: Parser Error: syntax error at or near "SELEC". Views: negs; '
        "gallery and triplets need --work. See docs/queries.md for examples."
    )
    r = runner.invoke(mine_app, ["sql", "SELECT * FROM nope", str(negs[0]), "--work", str(synth_work)])
    assert r.exit_code == 1
    assert r.output.strip() == (
        "Error: SQL: Catalog Error: Table with name nope does not exist. Views: gallery, "
        "gallery_emb, negs, triplet_emb, triplets. See docs/queries.md for examples."
    )
    r = runner.invoke(mine_app, ["stats", str(tmp_path / "missing.parquet")])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {tmp_path / 'missing.parquet'}: negatives table not found. Mine one with `cir-mine negatives`."
    )


def test_refuses_table_of_other_workspace(negs, synth_world):
    other = synth_world(n_gallery=40, n_triplets=10, dim=8, seed=3)
    with pytest.raises(DataError, match="mined from another workspace"):
        summarize([negs[0]], other)
