"""Hostile arrays and ids from outside (docs/reliability.md, "Arrays and ids from outside").

Feature imports in every format (.npy + ids, .parquet, clip-retrieval folders), ``--query-emb``, the
API's ``query_emb`` and ``Workspace.from_arrays`` go through one validator
(``cir_mine.data.validate``): each refusal is one ``Error:`` line, exit 1, the workspace byte-identical.
"""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import DataError
from cir_mine.data.synthetic import SynthConfig, generate
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.mine import MineConfig, mine_negatives
from cir_mine.miner.remine import Remine
from tests.fixtures import snapshot, tree

runner = CliRunner()
NEGS = ["--strategy", "midzone", "-k", "4", "-q", "--device", "cpu"]


def run(args):
    return runner.invoke(mine_app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("arrays")
    generate(SynthConfig(n_gallery=300, n_triplets=60, dim=16, seed=3), root / "W")
    return root


@pytest.fixture
def t(base, tmp_path):
    shutil.copytree(base / "W", tmp_path / "W")
    return tmp_path


def gallery(t):
    return Workspace(t / "W").gallery("train")


def refused(t, args, message, code=1):
    """The command fails with exactly ``Error: message`` and leaves W byte-identical, nothing added."""
    before, layout = snapshot(t / "W"), tree(t)
    r = run(args)
    assert r.exit_code == code, r.output
    assert r.output.strip() == f"Error: {message}", r.output
    assert snapshot(t / "W") == before and tree(t) == layout


def npy_import(t, emb, ids_text, name="F.npy", **kw):
    np.save(t / name, emb, allow_pickle=True)
    (t / "ids.txt").write_bytes(ids_text if isinstance(ids_text, bytes) else ids_text.encode())
    return [
        "index",
        "--work",
        t / "W",
        "--from-features",
        t / name,
        "--ids",
        t / "ids.txt",
        "--encoder-name",
        "synthetic",
        "--overwrite",
        "-q",
    ]


def ids_lines(g) -> str:
    return "".join(f"{i}\t{c}\n" for i, c in zip(g.image_ids, g.categories))


# ------------------------------------------------------------------------------------------ .npy + ids


def test_npy_features_of_complex_object_or_junk_are_refused(t):
    g = gallery(t)
    ids = ids_lines(g)
    refused(
        t,
        npy_import(t, g.embeddings.astype(np.complex64), ids),
        f"{t / 'F.npy'}: complex values (dtype complex64); expected real floating-point numbers (float32).",
    )
    refused(
        t,
        npy_import(t, np.array([{"a": 1}] * 300, dtype=object), ids),
        f"{t / 'F.npy'}: not a readable .npy array of numbers (Object arrays cannot be loaded when "
        f"allow_pickle=False). Save float32[n, d] with numpy.save.",
    )
    (t / "junk.npy").write_bytes(b"\x93NUMPY junk")
    args = npy_import(t, g.embeddings, ids)
    args[4] = t / "junk.npy"
    r = run(args)
    assert r.exit_code == 1 and r.output.startswith(f"Error: {t / 'junk.npy'}: not a readable .npy array of numbers (")


def test_npy_ids_that_are_not_utf8_empty_or_hold_a_bom(t):
    g = gallery(t)
    lines = ids_lines(g).encode()
    refused(
        t,
        npy_import(t, g.embeddings, b"\xff\xfe" + lines),
        f"{t / 'ids.txt'}: not UTF-8 text (byte 0xff at offset 0). Write one image id per line in UTF-8.",
    )
    bad = ids_lines(g).splitlines(keepends=True)
    bad[3] = "\tdress\n"
    refused(
        t,
        npy_import(t, g.embeddings, "".join(bad)),
        f"{t / 'ids.txt'}: image id of row 3 is empty. Every row needs an id; drop the row or name it.",
    )
    # a byte-order mark is stripped: the first id is the gallery's own and keeps its tags
    r = run(npy_import(t, g.embeddings, "\ufeff" + ids_lines(g)))
    assert r.exit_code == 0, r.output
    new = gallery(t)
    assert new.image_ids[0] == g.image_ids[0] and list(new.attributes[0]) == list(g.attributes[0])


def test_rows_of_huge_or_tiny_norm_are_normalized_not_zeroed(t):
    g = gallery(t)
    emb = g.embeddings.copy()
    emb[0] *= 1e20  # |x|^2 overflows float32
    emb[1] *= 1e-30  # |x|^2 underflows float32
    r = run(npy_import(t, emb, ids_lines(g)))
    assert r.exit_code == 0, r.output
    new = gallery(t)
    np.testing.assert_allclose(new.embeddings[:2], g.embeddings[:2], atol=1e-6)


def test_features_for_part_of_the_gallery_are_refused(t):
    """Features without the triplets' references and targets would leave a workspace every reader refuses."""
    g = gallery(t)
    t_ws = Workspace(t / "W").triplets("train")
    keep = np.ones(len(g), bool)
    keep[g.rows([t_ws.ref_ids[0]])] = False
    lines = [ln for ln, k in zip(ids_lines(g).splitlines(keepends=True), keep) if k]
    refused(
        t,
        npy_import(t, g.embeddings[keep], "".join(lines)),
        f"{t / 'F.npy'}: the features have no row for 1 image(s) that {t / 'W' / 'triplets.train.parquet'} "
        f"names as 'ref_id' (first: {t_ws.ref_ids[0]}, query {t_ws.query_ids[0]}). Import features for every "
        f"reference and target of the triplets, or drop those triplets first.",
    )


# ------------------------------------------------------------------------------------------ .parquet


def parquet_import(t, table):
    pq.write_table(table, t / "F.parquet")
    return [
        "index",
        "--work",
        t / "W",
        "--from-features",
        t / "F.parquet",
        "--encoder-name",
        "synthetic",
        "--overwrite",
        "-q",
    ]


def features_table(g, ids=None, emb=None, cats=None):
    cols = {
        "image_id": pa.array(list(g.image_ids) if ids is None else ids),
        "embedding": pa.array([list(map(float, r)) for r in g.embeddings]) if emb is None else emb,
    }
    if cats is not None:
        cols["category"] = pa.array(cats)
    return pa.table(cols)


def test_parquet_features_with_null_ids_ragged_or_null_rows_or_int_categories(t):
    g = gallery(t)
    F = t / "F.parquet"
    ids = list(g.image_ids)
    ids[5] = None
    refused(
        t,
        parquet_import(t, features_table(g, ids=ids)),
        f"{F}: image id of row 5 is null. Every row needs an id; drop the row or name it.",
    )
    rows = [list(map(float, r)) for r in g.embeddings]
    rows[7] = rows[7][:-1]
    refused(
        t,
        parquet_import(t, features_table(g, emb=pa.array(rows))),
        f"{F}: column 'embedding' has 15 values in row 7 (image id {g.image_ids[7]}) but 16 in row 0; every "
        f"vector needs the same dimension.",
    )
    rows = [list(map(float, r)) for r in g.embeddings]
    rows[2] = None
    refused(
        t,
        parquet_import(t, features_table(g, emb=pa.array(rows))),
        f"{F}: column 'embedding' is null in row 2 (image id {g.image_ids[2]}). Every row needs its vector; drop "
        f"the row or compute it.",
    )
    rows = [list(map(float, r)) for r in g.embeddings]
    rows[4][3] = None
    refused(
        t,
        parquet_import(t, features_table(g, emb=pa.array(rows))),
        f"{F}: column 'embedding' holds a null value in row 4 (image id {g.image_ids[4]}). Recompute that vector.",
    )
    refused(
        t,
        parquet_import(t, features_table(g, cats=list(range(len(g))))),
        f"{F}: category of row 0 is 0 (int); expected a string.",
    )


# ------------------------------------------------------------------------------------------ clip-retrieval


def clip_folder(t, g, parts=2, ids=None, cats=None):
    """The gallery as a clip-retrieval folder (float16 img_emb_i.npy + metadata_i.parquet with a key)."""
    root = t / "clip"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir(parents=True)
    ids = list(g.image_ids) if ids is None else ids
    cats = list(g.categories) if cats is None else cats
    for i, rows in enumerate(np.array_split(np.arange(len(g)), parts)):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", g.embeddings[rows].astype(np.float16))
        pq.write_table(
            pa.table({"key": [ids[r] for r in rows], "category": [cats[r] for r in rows]}),
            root / "metadata" / f"metadata_{i}.parquet",
        )
    return root


def clip_import(t, folder, *extra):
    return [
        "index",
        "--work",
        t / "W",
        "--from-features",
        folder,
        "--encoder-name",
        "synthetic",
        "--overwrite",
        "-q",
        *extra,
    ]


def test_clip_retrieval_import_keeps_the_tags_and_paths(t):
    g = gallery(t)
    r = run(clip_import(t, clip_folder(t, g)))
    assert r.exit_code == 0, r.output
    new = gallery(t)
    assert new.path.name == "gallery.train"  # the parts folder replaced the file
    kept = sum(list(a) == list(b) for a, b in zip(new.attributes, g.attributes))
    assert kept == len(g) and sum(len(a) for a in new.attributes) > 0


def test_clip_retrieval_with_an_untrainable_index_or_duplicated_ids_keeps_the_old_gallery(t):
    g = gallery(t)
    refused(
        t,
        clip_import(t, clip_folder(t, g), "--index", "IVF99999,Flat"),
        "--index 'IVF99999,Flat': 'IVF99999,Flat' has 99999 lists but the gallery has 300 images; FAISS needs at "
        "least one training vector per list. Use --index flat, or IVF7,Flat.",
        code=2,
    )
    ids, cats = list(g.image_ids), list(g.categories)
    ids[200], cats[200] = ids[10], cats[10]  # one image in both parts
    shutil.rmtree(t / "clip")
    folder = clip_folder(t, g, ids=ids, cats=cats)
    refused(
        t,
        clip_import(t, folder),
        f"{folder / 'metadata'}: image id '{ids[10]}' appears twice in category '{cats[10]}'. Each image needs "
        f"one feature row; drop the duplicates.",
    )


# ------------------------------------------------------------------------------------------ query embeddings


def test_query_emb_rows_of_huge_or_tiny_norm_mine_as_their_direction(t):
    ws = Workspace(t / "W")
    g, tr = ws.load("train")
    from cir_mine.miner.core.scores import zero_shot_queries

    q = zero_shot_queries(g.embeddings[g.rows(tr.ref_ids.tolist(), tr.categories.tolist())], tr.text_embeddings)
    big = q.copy()
    big[0] *= 1e20
    big[1] *= 1e-30
    np.save(t / "q.npy", q)
    np.save(t / "big.npy", big)
    assert (
        run(["negatives", "--work", t / "W", "--out", t / "a.parquet", "--query-emb", t / "q.npy", *NEGS]).exit_code
        == 0
    )
    assert (
        run(["negatives", "--work", t / "W", "--out", t / "b.parquet", "--query-emb", t / "big.npy", *NEGS]).exit_code
        == 0
    )
    a, b = pq.read_table(t / "a.parquet"), pq.read_table(t / "b.parquet")
    assert a.column("neg_id").equals(b.column("neg_id"))
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), atol=1e-5)


def test_the_api_refuses_what_the_cli_refuses_with_the_same_message(t):
    ws = Workspace(t / "W")
    g, tr = ws.load("train")
    nan = np.ones((len(tr), g.dim), np.float32)
    nan[7, 3] = np.nan
    np.save(t / "nan.npy", nan)
    r = run(["negatives", "--work", t / "W", "--out", t / "n.parquet", "--query-emb", t / "nan.npy", *NEGS])
    body = f"1 row(s) with NaN or inf values (first: row 7, query {tr.query_ids[7]}). Re-encode those queries."
    assert r.exit_code == 1 and r.output.strip() == f"Error: {t / 'nan.npy'}: {body}"
    cfg = MineConfig(strategy="midzone", k=4)
    with pytest.raises(DataError) as e:
        mine_negatives(ws, "train", cfg, query_emb=nan)
    assert str(e.value) == f"query_emb: {body}"
    with pytest.raises(DataError) as e:
        Remine(ws, "train", cfg=cfg)(nan)
    assert str(e.value) == f"query_emb: {body}"
    # unnormalized query embeddings are normalized: scores stay cosines
    res = mine_negatives(ws, "train", cfg, query_emb=np.ones((len(tr), g.dim), np.float32) * 7)
    assert np.abs(res.table.column("score").to_numpy()).max() <= 1 + 1e-5
    assert np.abs(res.table.column("target_score").to_numpy()).max() <= 1 + 1e-5


def test_from_arrays_ids_and_norms(t):
    emb = np.eye(4, dtype=np.float32)
    with pytest.raises(DataError) as e:
        Workspace.from_arrays(emb, ["a", None, "c", "d"])
    assert (
        str(e.value)
        == "Workspace.from_arrays: image_ids: id of row 1 is null. Every row needs an id; drop the row or name it."
    )
    with pytest.raises(DataError) as e:
        Workspace.from_arrays(emb, ["a", " ", "c", "d"])
    assert (
        str(e.value)
        == "Workspace.from_arrays: image_ids: id of row 1 is empty. Every row needs an id; drop the row or name it."
    )
    with pytest.raises(DataError) as e:
        Workspace.from_arrays(emb, ["a", "b\x00", "c", "d"])
    assert str(e.value) == "Workspace.from_arrays: image_ids: id of row 1 ('b\\x00') holds a NUL character. Remove it."
    ws = Workspace.from_arrays(
        emb * np.array([[1e20], [1e-30], [1], [3]], np.float32), ["\ufeffa", "b", "c", "d"], normalize=True
    )
    g = ws.gallery("train")
    assert g.image_ids[0] == "a" and np.allclose(g.embeddings, emb)
