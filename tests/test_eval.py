"""cir-mine eval / evaluate_queries: a model's own query embeddings by the FashionIQ and CIRR protocols
of CLIP4Cir's validate.py, checked against recalls computed by hand."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cir_mine import DataError, Workspace, evaluate_queries
from cir_mine.cli import mine_app
from cir_mine.data.workspace import gallery_table, triplets_table, write_table

runner = CliRunner()
D = 4


def ladder(n: int) -> np.ndarray:
    """n unit vectors whose score against e0 = (1, 0, 0, 0) falls with the index: 1 - 0.01 i."""
    c = 1 - 0.01 * np.arange(n)
    return np.stack([c, np.sqrt(1 - c**2), np.zeros(n), np.zeros(n)], 1).astype(np.float32)


def write_ws(root, split, ids, cats, queries, img_set=None) -> Workspace:
    """queries: (query id, category, ref id, target id); every query embedding is e0."""
    ws = Workspace(root)
    root.mkdir(parents=True, exist_ok=True)
    emb = np.concatenate([ladder(n) for n in [cats.count(c) for c in dict.fromkeys(cats)]])
    write_table(gallery_table(ids, cats, [[] for _ in ids], emb), ws.gallery_path(split))
    text = np.tile(np.eye(D, dtype=np.float32)[1], (len(queries), 1))
    write_table(
        triplets_table(
            [q[0] for q in queries],
            [q[1] for q in queries],
            [q[2] for q in queries],
            [q[3] for q in queries],
            [["x"]] * len(queries),
            text,
            img_set=img_set,
        ),
        ws.triplets_path(split),
    )
    ws.write_manifest(source="test")
    return ws


@pytest.fixture
def fiq(tmp_path):
    """Two categories of 70 images each; image i of a category scores 1 - 0.01 i against every query."""
    ids = [f"d{i}" for i in range(70)] + [f"s{i}" for i in range(70)]
    cats = ["dress"] * 70 + ["shirt"] * 70
    # (reference, target) -> rank of the target with the reference kept / removed
    pairs = {"dress": [(0, 5), (3, 10), (60, 55), (1, 49)], "shirt": [(2, 0), (0, 50)]}
    queries = [
        (f"{c}-val-{j:05d}", c, f"{c[0]}{r}", f"{c[0]}{t}") for c, ps in pairs.items() for j, (r, t) in enumerate(ps)
    ]
    return write_ws(tmp_path / "fiq", "val", ids, cats, queries), [q[0] for q in queries]


@pytest.fixture
def cirr(tmp_path):
    ids = [f"c{i}" for i in range(60)]
    rows = [
        (0, 5, [0, 5, 2, 7, 9, 11]),
        (3, 1, [3, 1, 4, 6, 8, 10]),
        (20, 0, [20, 0, 1, 2, 3, 4]),
        (0, 30, [0, 30, 29, 28, 27, 31]),
    ]
    queries = [(f"cirr-val-{j}", "", f"c{r}", f"c{t}") for j, (r, t, _) in enumerate(rows)]
    members = [[f"c{m}" for m in ms] for _, _, ms in rows]
    return write_ws(tmp_path / "cirr", "val", ids, [""] * 60, queries, img_set=members), [q[0] for q in queries]


def e0(n):
    return np.tile(np.eye(D, dtype=np.float32)[0], (n, 1))


def test_fashioniq_keeps_the_reference_as_clip4cir(fiq):
    ws, qids = fiq
    m = evaluate_queries(ws, "val", e0(6))
    # by hand: dress ranks 5, 10, 55, 49 (the reference above the target counts); shirt ranks 0, 50
    assert m["per_category"] == {
        "dress": {"R@10": 25.0, "R@50": 75.0, "n": 4},
        "shirt": {"R@10": 50.0, "R@50": 50.0, "n": 2},
    }
    assert (m["R@10"], m["R@50"], m["avg"], m["reference"]) == (37.5, 62.5, 50.0, "kept")
    # reference removed: dress ranks 4, 9, 55, 48; shirt 0, 49
    x = evaluate_queries(ws, "val", e0(6), exclude_reference=True)
    assert x["per_category"] == {
        "dress": {"R@10": 50.0, "R@50": 75.0, "n": 4},
        "shirt": {"R@10": 50.0, "R@50": 100.0, "n": 2},
    }
    assert (x["R@10"], x["R@50"], x["reference"]) == (50.0, 87.5, "removed")


def test_cirr_removes_the_reference_and_scores_subsets(cirr):
    ws, qids = cirr
    m = evaluate_queries(ws, "val", e0(4))
    # by hand: global ranks 4, 1, 0, 29 (reference removed); subset ranks 1, 0, 0, 3
    assert {k: m[k] for k in ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "avg")} == {
        "R@1": 25.0,
        "R@5": 75.0,
        "R@10": 75.0,
        "R@50": 100.0,
        "Rs@1": 50.0,
        "Rs@2": 75.0,
        "Rs@3": 75.0,
        "avg": 62.5,
    }
    assert m["protocol"] == "cirr" and m["reference"] == "removed"


def test_query_ids_name_the_rows(fiq):
    ws, qids = fiq
    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, D)).astype(np.float32)
    perm = rng.permutation(6)
    assert evaluate_queries(ws, "val", q[perm], query_ids=[qids[i] for i in perm]) == evaluate_queries(ws, "val", q)
    with pytest.raises(DataError, match="1 of the split's 6 queries are missing"):
        evaluate_queries(ws, "val", q[:5], query_ids=qids[:5])


def test_cli_eval(fiq, cirr, tmp_path):
    ws, qids = fiq
    np.save(tmp_path / "q.npy", e0(6)[::-1].copy())
    (tmp_path / "ids.txt").write_text("\n".join(reversed(qids)))
    r = runner.invoke(
        mine_app,
        [
            "eval",
            "--work",
            str(ws.root),
            "--query-emb",
            str(tmp_path / "q.npy"),
            "--query-ids",
            str(tmp_path / "ids.txt"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.output == (
        "fashioniq val: 6 queries, reference kept in the gallery\n"
        "  dress: R@10 25.00  R@50 75.00  (4 queries)\n"
        "  shirt: R@10 50.00  R@50 50.00  (2 queries)\n"
        "  average: R@10 37.50  R@50 62.50  avg (R@10 + R@50) / 2 50.00\n"
    )
    r = runner.invoke(
        mine_app,
        [
            "eval",
            "--work",
            str(ws.root),
            "--query-emb",
            str(tmp_path / "q.npy"),
            "--query-ids",
            str(tmp_path / "ids.txt"),
            "--exclude-reference",
            "--json",
        ],
    )
    assert r.exit_code == 0 and json.loads(r.output)["R@50"] == 87.5
    cws, _ = cirr
    np.save(tmp_path / "c.npy", e0(4))
    r = runner.invoke(mine_app, ["eval", "--work", str(cws.root), "--query-emb", str(tmp_path / "c.npy")])
    assert r.exit_code == 0 and r.output == (
        "cirr val: 4 queries, reference removed from the gallery\n"
        "R@1 25.00  R@5 75.00  R@10 75.00  R@50 100.00  Rs@1 50.00  Rs@2 75.00  Rs@3 75.00  avg (R@5 + Rs@1) / 2 62.50\n"
    )
    # errors: the rows of another split, a missing id file, no such split
    r = runner.invoke(mine_app, ["eval", "--work", str(ws.root), "--query-emb", str(tmp_path / "c.npy")])
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {tmp_path / 'c.npy'}: shape (4, 4), expected (6, 4): one row per query of the split, in the gallery's "
        f"dimension. Give float32[n_queries, d], one row per query in the triplets' row order."
    )
    r = runner.invoke(
        mine_app,
        [
            "eval",
            "--work",
            str(ws.root),
            "--query-emb",
            str(tmp_path / "q.npy"),
            "--query-ids",
            str(tmp_path / "none.txt"),
        ],
    )
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: {tmp_path / 'none.txt'}: query ids not found. Write one query id per line, in the rows' order."
    )


def test_an_image_in_two_categories_is_in_both_galleries(tmp_path):
    """As CLIP4Cir's per-category galleries (1,180 shirt/toptee ASINs of the real train split)."""
    from cir_mine.data.fashioniq import load_fashioniq
    from tests.fixtures import make_fashioniq

    root = make_fashioniq(tmp_path / "f", images=False)
    split = json.loads((root / "image_splits" / "split.toptee.train.json").read_text())
    shared = json.loads((root / "image_splits" / "split.shirt.train.json").read_text())[0]
    (root / "image_splits" / "split.toptee.train.json").write_text(json.dumps(split + [shared]))
    images, _ = load_fashioniq(root, "train")
    assert sorted(i.category for i in images if i.image_id == shared) == ["shirt", "toptee"]


def test_exclude_reference_says_what_it_removes():
    """CLIP4Cir's FashionIQ validation keeps the reference in the gallery; the option is not 'the protocol'."""
    import typer

    from cir_mine.cli import train_app

    train = typer.main.get_command(train_app)
    for cmd in (train, typer.main.get_command(mine_app).commands["eval"]):
        opt = next(p for p in cmd.params if p.name == "exclude_reference")
        assert "protocol" not in opt.help and "CLIP4Cir's validate.py keeps it" in opt.help, cmd.name
