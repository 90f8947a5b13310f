import json

import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.cirr import load_cirr
from cir_mine.data.errors import DataError
from cir_mine.data.fashioniq import load_fashioniq

runner = CliRunner()


@pytest.mark.slow
def test_real_fashioniq_matches_files(shared_fashioniq):
    root = shared_fashioniq
    images, queries = load_fashioniq(root, "train")
    n_caps, n_empty, split_ids = 0, 0, set()
    for cat in ("dress", "shirt", "toptee"):
        caps = json.loads((root / "captions" / f"cap.{cat}.train.json").read_text())
        n_caps += len(caps)
        n_empty += sum(1 for c in caps if not any(x.strip() for x in c["captions"]))
        split_ids |= set(json.loads((root / "image_splits" / f"split.{cat}.train.json").read_text()))
    assert len(queries) == n_caps - n_empty
    assert split_ids <= {i.image_id for i in images}
    q = queries[0]
    assert q.query_id == "dress-train-00000" and q.captions == (
        "is solid black with no sleeves",
        "is black with straps",
    )
    assert q.text == "is solid black with no sleeves and is black with straps"
    tagged = [i for i in images if i.attributes]
    assert len(tagged) > 20000 and all(":" in a for a in tagged[0].attributes)
    assert {a.split(":")[0] for i in tagged[:500] for a in i.attributes} <= {
        "category",
        "texture",
        "fabric",
        "shape",
        "part",
        "style",
    }


def test_real_cirr_matches_files(shared_cirr):
    root = shared_cirr
    images, queries = load_cirr(root, "val")
    caps = json.loads((root / "captions" / "cap.rc2.val.json").read_text())
    names = json.loads((root / "image_splits" / "split.rc2.val.json").read_text())
    assert len(images) == len(names) and len(queries) == len(caps)
    by_id = {q.query_id: q for q in queries}
    for c in caps[:200]:
        q = by_id[f"cirr-val-{c['pairid']}"]
        assert q.target_id == c["target_hard"] and q.captions == (c["caption"],)
        assert set(q.extra_positive_ids) == {k for k, v in c["target_soft"].items() if v >= 0.5} - {c["target_hard"]}
        assert set(q.verified_negative_ids) == {k for k, v in c["target_soft"].items() if v == -1}
        assert list(q.img_set) == c["img_set"]["members"]


def test_fixture_fashioniq(fiq_root):
    images, queries = load_fashioniq(fiq_root, "train")
    assert len(images) == 18 and len(queries) == 15
    assert all(i.path and i.path.endswith(".png") for i in images)
    assert "fabric:silk" in images[0].attributes


def test_fixture_cirr(cirr_root):
    images, queries = load_cirr(cirr_root, "val")
    assert len(images) == 12 and len(queries) == 10
    assert queries[0].extra_positive_ids == ("dev-2-0-img0",)
    assert queries[0].verified_negative_ids == ("dev-3-0-img0",)


def test_malformed_json_cli(fiq_root):
    p = fiq_root / "captions" / "cap.shirt.train.json"
    p.write_text('[{"candidate": "x", ')
    r = runner.invoke(mine_app, ["check", "--dataset", "fashioniq", "--root", str(fiq_root)])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {p}: malformed JSON at line 1, column 21 (Expecting property name "
        f"enclosed in double quotes). Re-download or repair the file."
    )


def test_missing_file_cli(fiq_root):
    r = runner.invoke(mine_app, ["check", "--dataset", "fashioniq", "--root", str(fiq_root), "--split", "val"])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {fiq_root}/image_splits/split.dress.val.json: file not found. "
        f"Is 'val' a FashionIQ split (train, val, test)?"
    )


def test_unknown_category(fiq_root):
    with pytest.raises(DataError, match="unknown FashionIQ category 'pants'; choose from dress, shirt, toptee"):
        load_fashioniq(fiq_root, "train", categories=["pants"])


def test_non_string_caption(fiq_root):
    p = fiq_root / "captions" / "cap.dress.train.json"
    caps = json.loads(p.read_text())
    caps[1]["captions"] = [3, "is red"]
    p.write_text(json.dumps(caps))
    with pytest.raises(DataError, match=r"entry 1 caption 0 must be a string, found 3"):
        load_fashioniq(fiq_root, "train")


def test_check_command_output(cirr_root):
    r = runner.invoke(mine_app, ["check", "--dataset", "cirr", "--root", str(cirr_root), "--split", "val"])
    assert r.exit_code == 0, r.output
    assert "12 images (12 with image files, 0 with attributes), 10 queries" in r.output
