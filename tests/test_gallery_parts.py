"""Gallery folders of row-aligned parts (gallery.{split}/part-*.parquet) read as one gallery, and
clip-retrieval embedding folders (img_emb/ + metadata/) imported as such a folder."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import DataError, SchemaError
from cir_mine.data.workspace import Workspace, gallery_table, l2_normalize, write_table
from cir_mine.miner.core.mine import MineConfig, mine_negatives
from cir_mine.miner.core.search.persist import load_index

runner = CliRunner()


def _split_into_parts(src: Workspace, dst_root, sizes, split="train") -> Workspace:
    """A copy of ``src`` whose gallery is a folder of parts of the given sizes (same rows, same order)."""
    t = pq.read_table(src.gallery_path(split))
    dst = Workspace(dst_root)
    dst_root.mkdir()
    starts = np.cumsum([0, *sizes])
    assert starts[-1] == t.num_rows
    dst.write_gallery(split, (t.slice(a, b - a) for a, b in zip(starts[:-1], starts[1:])))
    write_table(pq.read_table(src.triplets_path(split)), dst.triplets_path(split))
    dst.write_manifest(source="test")
    return dst


def test_parts_folder_reads_as_the_single_file(synth_work, tmp_path):
    src = Workspace(synth_work)
    ws = _split_into_parts(src, tmp_path / "w", [1000, 1, 999, 1000])
    assert ws.gallery_path("train") == tmp_path / "w" / "gallery.train"
    assert len(ws.gallery_files("train")) == 4 and ws.splits() == ["train"]
    a, b = src.gallery("train"), ws.gallery("train")
    assert a.image_ids.tolist() == b.image_ids.tolist() and np.array_equal(a.embeddings, b.embeddings)
    assert ws.manifest()["counts"]["gallery.train"] == 3000
    cfg = MineConfig(strategy="hardest", k=5)
    assert mine_negatives(ws, "train", cfg).table.equals(mine_negatives(src, "train", cfg).table)


def test_parts_errors_name_the_part(synth_work, tmp_path):
    ws = _split_into_parts(Workspace(synth_work), tmp_path / "w", [1500, 1500])
    rng = np.random.default_rng(0)
    other = gallery_table(["x"], ["dress"], [[]], l2_normalize(rng.standard_normal((1, 8)).astype(np.float32)))
    write_table(other, ws.gallery_dir("train") / "part-00002.parquet")
    with pytest.raises(
        SchemaError,
        match=r"part-00002\.parquet: columns \(.*embedding: fixed_size_list<element: "
        r"float>\[8\].*\) differ from the first part's",
    ):
        ws.gallery("train")
    for p in ws.gallery_dir("train").glob("part-*.parquet"):
        p.unlink()
    with pytest.raises(DataError, match=r"gallery\.train: a gallery folder needs part-\*\.parquet files and has none"):
        ws.gallery("train")


def test_file_and_folder_together_is_an_error(synth_work, tmp_path):
    ws = _split_into_parts(Workspace(synth_work), tmp_path / "w", [1500, 1500])
    write_table(pq.read_table(Workspace(synth_work).gallery_path("train")), ws.gallery_file("train"))
    with pytest.raises(
        DataError, match="split 'train' has both gallery.train.parquet and the parts folder gallery.train/"
    ):
        ws.gallery("train")
    ws.write_gallery("train", pq.read_table(ws.gallery_file("train")))  # one table: the folder goes
    assert not ws.gallery_dir("train").exists() and len(ws.gallery("train")) == 3000


def _clip_retrieval_folder(root, sizes, dim=16, seed=0, ids_col="image_path"):
    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    ids, embs = [], []
    for i, n in enumerate(sizes):
        emb = rng.standard_normal((n, dim)).astype(np.float16)  # clip-retrieval writes float16
        part_ids = [f"/data/img{i}_{j}.jpg" for j in range(n)]
        np.save(root / "img_emb" / f"img_emb_{i}.npy", emb)
        pq.write_table(
            pa.table({ids_col: part_ids, "caption": ["a photo"] * n}), root / "metadata" / f"metadata_{i}.parquet"
        )
        ids += part_ids
        embs.append(emb.astype(np.float32))
    return ids, np.concatenate(embs)


def test_import_clip_retrieval_folder_as_parts(tmp_path):
    sizes = [30, 5, 7] + [3] * 9 + [11]  # 13 files: img_emb_10 sorts after _9
    ids, emb = _clip_retrieval_folder(tmp_path / "laion", sizes)
    work = tmp_path / "w"
    r = runner.invoke(
        mine_app,
        [
            "index",
            "--work",
            str(work),
            "--device",
            "cpu",
            "--encoder-name",
            "ViT-B-32/laion",
            "--from-features",
            str(tmp_path / "laion"),
        ],
    )
    assert r.exit_code == 0, r.output
    ws = Workspace(work)
    assert [p.name for p in ws.gallery_files("train")][-1] == "part-00012.parquet"
    assert [pq.read_metadata(p).num_rows for p in ws.gallery_files("train")] == sizes
    g = ws.gallery("train")
    assert g.image_ids.tolist() == ids
    np.testing.assert_allclose(g.embeddings, emb / np.linalg.norm(emb, axis=1, keepdims=True), atol=1e-6)
    assert load_index(ws.index_path("train"), device="cpu").ntotal == len(ids)
    assert ws.manifest()["encoder"] == {"name": "ViT-B-32/laion", "dim": 16}


def test_clip_retrieval_errors_before_writing(tmp_path):
    _clip_retrieval_folder(tmp_path / "laion", [4, 4])
    (tmp_path / "laion" / "metadata" / "metadata_1.parquet").unlink()
    work = tmp_path / "w"
    r = runner.invoke(mine_app, ["index", "--work", str(work), "--from-features", str(tmp_path / "laion")])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {tmp_path / 'laion' / 'metadata' / 'metadata_1.parquet'}: file not found; "
        f"img_emb_1.npy needs its row-aligned metadata file."
    )
    assert not (work / "gallery.train").exists()
    r = runner.invoke(mine_app, ["index", "--work", str(work), "--from-features", str(tmp_path)])
    assert r.exit_code == 1 and "not a clip-retrieval embedding folder (no img_emb/img_emb_N.npy files)" in r.output


def test_sql_views_read_every_part(synth_work, tmp_path):
    from cir_mine.miner.inspection.sql import connect, run_sql

    ws = _split_into_parts(Workspace(synth_work), tmp_path / "w", [1000, 2000])
    con = connect([], ws, "train")
    assert run_sql(con, "SELECT count(*) FROM gallery").rows == [(3000,)]
    assert run_sql(con, "SELECT count(*) FROM gallery_emb").rows == [(3000,)]
