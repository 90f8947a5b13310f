import pyarrow as pa
import pytest

from cir_mine.data.errors import DataError, SchemaError
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.tables import NEGATIVES_SCHEMA, read_negatives, read_negatives_meta, write_negatives


def _rows(n=3):
    return pa.table(
        {
            "query_id": ["q"] * n,
            "ref_id": ["r"] * n,
            "target_id": ["t"] * n,
            "neg_id": [f"n{i}" for i in range(n)],
            "neg_category": ["dress"] * n,
            "strategy": ["random"] * n,
            "rank": list(range(n)),
            "score": [0.5] * n,
            "target_score": [0.7] * n,
            "delta": [0.2] * n,
            "round": [0] * n,
            "category_match": [True] * n,
            "attr_overlap": [0.5] * n,
            "seed": [0] * n,
        }
    )


def test_roundtrip_and_workspace_check(tmp_path, synth_work):
    ws = Workspace(synth_work)
    p = tmp_path / "negs.parquet"
    write_negatives(_rows(), p, {"manifest_hash": ws.manifest_hash(), "config": {"k": 3}})
    t = read_negatives(p, ws)
    assert t.table.schema == NEGATIVES_SCHEMA and t.table.num_rows == 3 and t.config == {"k": 3}
    write_negatives(_rows(), p, {"manifest_hash": "0000", "config": {}})
    with pytest.raises(DataError, match=r"mined from another workspace \(manifest hash 0000"):
        read_negatives(p, ws)


def test_wrong_schema(tmp_path):
    with pytest.raises(SchemaError, match="missing column 'neg_id'"):
        write_negatives(_rows().drop(["neg_id"]), tmp_path / "x.parquet", {})
    import pyarrow.parquet as pq

    pq.write_table(_rows(), tmp_path / "plain.parquet")
    with pytest.raises(SchemaError, match="not a cir-mine negatives table"):
        read_negatives(tmp_path / "plain.parquet")


def test_meta_only_reader_checks_like_the_full_reader(tmp_path, synth_work):
    ws = Workspace(synth_work)
    p = tmp_path / "negs.parquet"
    write_negatives(_rows(), p, {"manifest_hash": ws.manifest_hash(), "config": {"k": 3}})
    assert read_negatives_meta(p, ws) == read_negatives(p, ws).meta
    write_negatives(_rows(), p, {"manifest_hash": "0000", "config": {}})
    with pytest.raises(DataError, match=r"mined from another workspace \(manifest hash 0000"):
        read_negatives_meta(p, ws)
    import pyarrow.parquet as pq

    pq.write_table(_rows(), tmp_path / "plain.parquet")
    with pytest.raises(SchemaError, match="not a cir-mine negatives table"):
        read_negatives_meta(tmp_path / "plain.parquet")
    with pytest.raises(DataError, match="negatives table not found"):
        read_negatives_meta(tmp_path / "absent.parquet")


def test_text_columns_are_dictionary_encoded_and_numbers_plain(tmp_path):
    """Parquet files are written with a dictionary for ids, categories and attribute lists only:
    the text reads back the same and numbers (scores, embeddings) carry no dictionary attempt."""
    import pyarrow.parquet as pq

    from cir_mine.data.parquet import dictionary_columns, write_table

    t = pa.table(
        {
            "id": ["a", "b", "a"],
            "tags": pa.array([["x:1"], [], ["x:1", "y:2"]]),
            "emb": pa.array([[1.0, 0.0]] * 3, pa.list_(pa.float32(), 2)),
            "score": pa.array([0.5, 0.25, 0.5], pa.float32()),
        }
    )
    assert dictionary_columns(t.schema) == ["id", "tags.list.element"]
    write_table(t, tmp_path / "t.parquet")
    rg = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0)
    enc = {rg.column(i).path_in_schema: rg.column(i).encodings for i in range(rg.num_columns)}
    assert "RLE_DICTIONARY" in enc["id"] and "RLE_DICTIONARY" in enc["tags.list.element"]
    assert "RLE_DICTIONARY" not in enc["emb.list.element"] and "RLE_DICTIONARY" not in enc["score"]
    assert pq.read_table(tmp_path / "t.parquet").equals(t)
