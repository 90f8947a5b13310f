"""cir-mine inspect / report: real PNG and HTML files rendered from generated fixtures."""

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.workspace import Workspace
from cir_mine.miner.inspection.contact_sheet import TILE_IN, attribute_diff, guard_counts, sheet_rows
from cir_mine.miner.core.tables import read_negatives
from tests.fixtures import COLORS
from tests.fixtures import make_image_work, make_negatives

runner = CliRunner()
PNG_B64 = "data:image/png;base64,"


@pytest.fixture(scope="module")
def image_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgworld")
    work, images = make_image_work(d)
    negs = make_negatives(
        work, d / "negs.parquet", k=4, strategy="hardest", guards_per_query={"q1": {"target": 1, "near_duplicate": 2}}
    )
    return work, images, negs


@pytest.fixture(scope="module")
def synth_negs(synth_work, tmp_path_factory):
    d = tmp_path_factory.mktemp("rnegs")
    return (
        make_negatives(synth_work, d / "r0.parquet", k=5, strategy="random", seed=1, drop=2),
        make_negatives(synth_work, d / "r1.parquet", k=5, strategy="hardest", mining_round=1),
    )


def _png(path_or_bytes):
    im = Image.open(path_or_bytes if not isinstance(path_or_bytes, bytes) else io.BytesIO(path_or_bytes))
    im.load()
    return im


def test_inspect_images_show_the_right_pictures(image_world, tmp_path):
    work, images, negs = image_world
    out = tmp_path / "sheet.png"
    r = runner.invoke(
        mine_app,
        [
            "inspect",
            str(negs),
            "--work",
            str(work),
            "--root",
            str(images),
            "--query-id",
            "q0",
            "--query-id",
            "q1",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    im = _png(out).convert("RGB")
    assert r.output.strip() == f"wrote {out}: 2 queries, {im.width}x{im.height} px, thumbnails"
    assert im.width == round((6 * TILE_IN + 0.1) * 100) and im.height > 600
    # the reference of q0 is img000 (black), its target img002 (red): sample each tile's centre
    tile, colors = TILE_IN * 0.88, list(COLORS)
    y = int((0.35 + 0.45 + tile / 2) * 100)
    arr = np.asarray(im, dtype=np.float64)
    for j, color in ((0, colors[0]), (1, colors[2])):
        x = int((0.05 + j * TILE_IN + TILE_IN / 2) * 100)
        np.testing.assert_allclose(arr[y - 5 : y + 5, x - 5 : x + 5].mean(axis=(0, 1)), COLORS[color], atol=25)


def test_inspect_feature_only_cards(synth_work, synth_negs, tmp_path):
    out = tmp_path / "cards.png"
    r = runner.invoke(
        mine_app,
        [
            "inspect",
            str(synth_negs[1]),
            "--work",
            str(synth_work),
            "--sample",
            "3",
            "--max-negatives",
            "4",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    im = _png(out)
    assert "attribute cards (no image paths)" in r.output and "3 queries" in r.output
    assert im.width == round((6 * TILE_IN + 0.1) * 100) and im.height >= 3 * 300


def test_sheet_rows_order_labels_and_guards(image_world):
    work, images, negs = image_world
    ws = Workspace(work)
    nt = read_negatives(negs, ws)
    rows = sheet_rows(nt, ws, "train", ["q1", "q2"], images, max_negatives=8)
    g = ws.gallery("train")
    for row in rows:
        assert [t.role for t in row.tiles[:2]] == ["reference", "target"]
        ranks = [int(t.lines[0].split(" r")[-1]) for t in row.tiles[2:]]
        assert ranks == sorted(ranks) and len(ranks) == 4
        tgt = row.tiles[1].attributes
        for t in row.tiles[2:]:
            plus, minus = attribute_diff(t.attributes, tgt)
            assert set(plus) == set(t.attributes) - set(tgt) and (t.plus, t.minus) == (plus, minus)
            assert t.image is not None and t.image.exists()
            assert t.attributes == g.attributes[g.row_of[t.image_id]]
    assert (rows[0].guards, rows[0].guards_scope) == ({"target": 1, "near_duplicate": 2}, "query")
    assert rows[1].guards_scope == "table" and rows[1].guards["reference"] == 6
    assert guard_counts({"guards": {"cap": {"removed": 4}}}) == ({"cap": 4}, "table")


def test_inspect_errors_exact(image_world, tmp_path, monkeypatch):
    work, images, negs = image_world
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "s.png")
    r = runner.invoke(mine_app, ["inspect", str(negs), "--work", str(work), "--query-id", "q0", "--out", out])
    assert r.exit_code == 1
    assert r.output.strip() == (
        "Error: dress/img000.png: image file not found (gallery path of 'img000'). "
        "Pass the dataset root, the folder that holds dress/img000.png, with --root."
    )
    r = runner.invoke(
        mine_app, ["inspect", str(negs), "--work", str(work), "--query-id", "q0", "--out", out, "--root", str(tmp_path)]
    )
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {tmp_path / 'dress/img000.png'}: image file not found (gallery path of "
        f"'img000', dress/img000.png under {tmp_path}). Pass the dataset root, the folder "
        f"that holds dress/img000.png, with --root."
    )
    r = runner.invoke(mine_app, ["inspect", str(negs), "--work", str(work), "--query-id", "qX", "--out", out])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {negs}: query id 'qX' has no negatives in this table. List the queries "
        f'with `cir-mine sql "SELECT DISTINCT query_id FROM negs" {negs}`.'
    )
    r = runner.invoke(mine_app, ["inspect", str(negs), "--work", str(work), "--out", out])
    assert r.exit_code == 2 and r.output.strip() == "Error: pass --query-id ID (repeatable) or --sample N."
    r = runner.invoke(
        mine_app, ["inspect", str(negs), "--work", str(work), "--query-id", "q0", "--sample", "2", "--out", out]
    )
    assert r.exit_code == 2 and r.output.strip() == "Error: pass either --query-id or --sample, not both."
    assert not (tmp_path / "s.png").exists()


def test_inspect_absolute_paths_without_root(tmp_path):
    work, _ = make_image_work(tmp_path, absolute=True)
    negs = make_negatives(work, tmp_path / "n.parquet", k=3)
    r = runner.invoke(
        mine_app, ["inspect", str(negs), "--work", str(work), "--sample", "1", "--out", str(tmp_path / "s.png")]
    )
    assert r.exit_code == 0 and "thumbnails" in r.output, r.output


def _embedded_pngs(html):
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_one_table_with_images(image_world, tmp_path):
    work, images, negs = image_world
    out = tmp_path / "report.html"
    r = runner.invoke(
        mine_app, ["report", str(negs), "--work", str(work), "--root", str(images), "--out", str(out), "--sheets", "2"]
    )
    assert r.exit_code == 0, r.output
    html = out.read_text()
    names = ["delta", "scatter", "mix", "per_query", "top_negatives", "sheet0"]
    assert f"6 plots ({', '.join(names)})" in r.output
    assert html.count(PNG_B64) == 6
    for n in names:
        assert f'id="plot-{n}"' in html
    for png in _embedded_pngs(html):
        im = _png(png)
        assert im.width >= 300 and im.height >= 150
    assert "Round-to-round" not in html
    assert not re.search(r'(src|href)="(?!data:)', html)  # self-contained: nothing to fetch


def test_report_rounds(synth_work, synth_negs, tmp_path):
    out = tmp_path / "report.html"
    r = runner.invoke(
        mine_app,
        [
            "report",
            *map(str, synth_negs),
            "--work",
            str(synth_work),
            "--out",
            str(out),
            "--sheets",
            "1",
            "--max-negatives",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert html.count(PNG_B64) == 9 and 'id="plot-overlap"' in html and 'id="plot-hardness"' in html
    assert 'id="plot-sheet0"' in html and 'id="plot-sheet1"' in html
    assert "2 queries got fewer than k=5 negatives" in html
    assert len(_embedded_pngs(html)) == 9


def test_report_refuses_other_workspace(image_world, synth_work, tmp_path):
    work, images, negs = image_world
    r = runner.invoke(mine_app, ["report", str(negs), "--work", str(synth_work), "--out", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and "mined from another workspace" in r.output
    assert not (tmp_path / "r.html").exists()


def test_on_a_mined_table(synth_work, tmp_path):
    """stats/sql/inspect/report read what `cir-mine negatives` writes (unranked rows, guard dicts, hints)."""
    from cir_mine.miner.core.mine import MineConfig, mine_to_file
    from cir_mine.miner.inspection.stats import format_stats, summarize

    ws = Workspace(synth_work)
    out = tmp_path / "mix.parquet"
    res = mine_to_file(ws, "train", MineConfig.of(mix="midzone:0.6,random:0.4", k=5, seed=0), out)
    st = summarize([out], synth_work).tables[0]
    assert st.rows == res.table.num_rows and st.k == 5
    assert st.guards == {g: v["removed"] for g, v in res.meta["guards"].items()}
    assert st.shortfall["count"] == res.meta["shortfall"]["count"]
    text = format_stats(summarize([out], synth_work))
    if st.shortfall["count"]:
        assert "to loosen: " in text and "midzone: widen MineConfig.of(delta_lo=..., delta_hi=...)" in text
    r = runner.invoke(
        mine_app, ["inspect", str(out), "--work", str(synth_work), "--sample", "2", "--out", str(tmp_path / "s.png")]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        mine_app, ["report", str(out), "--work", str(synth_work), "--sheets", "1", "--out", str(tmp_path / "r.html")]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.html").read_text().count(PNG_B64) == 6


def test_diff_labels():
    from cir_mine.miner.inspection.contact_sheet import Tile, diff_lines, pack_tokens

    same = Tile("negative", "n", "dress", ["color:red"], None, [], [], [])
    assert diff_lines(same) == [("= the target's attributes", "#d97706")]
    t = Tile("negative", "n", "dress", ["color:red", "sleeve:long"], None, [], ["color:red"], ["color:blue"])
    assert [line for line, _ in diff_lines(t)] == ["+color:red", "−color:blue"]
    assert pack_tokens(["+aaaa", "+bbbb", "+cccc", "+dddd"], 11, 1) == ["+aaaa (+3 more)"]  # suffix makes room
    assert pack_tokens(["+aaaa", "+bbbb", "+cccc"], 11, 2) == ["+aaaa +bbbb", "+cccc"]
    assert pack_tokens([], 10, 2) == []
