"""Caption attribute extraction: vocabulary file, negation, comparatives, gallery mapping."""

import itertools
import json

import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import DataError
from cir_mine.data.synthetic import GROUPS, SynthConfig, phrase, plan
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.attributes import (
    DEFAULT_VOCABULARY,
    Requested,
    Vocabulary,
    attr_overlap,
    extract,
    extract_many,
    group_values,
    requested_status,
)


def got(text, vocab=None):
    return extract(text, vocab).as_strings()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("has no sleeves", ["+sleeve:sleeveless"]),
        ("is not striped", ["-pattern:striped"]),
        ("isn't red", ["-color:red"]),
        ("without a pattern", ["+pattern:solid"]),
        ("has a pattern", ["-pattern:solid"]),
        ("doesn't have a collar", ["-collar:collar"]),
        ("has no collar or buttons", ["-closure:buttons", "-collar:collar"]),
        ("is blue instead of black", ["+color:blue", "-color:black"]),
        ("is more red and less blue", ["+color:red", "-color:blue"]),
        ("has sleeves", ["-sleeve:sleeveless"]),
        ("not red and is green", ["+color:green", "-color:red"]),  # "and" ends the negation
    ],
)
def test_negation(text, expected):
    assert got(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("is darker", ["~shade:more"]),
        ("is lighter colored", ["~shade:less"]),
        ("is longer", ["~length:more"]),
        ("is much shorter", ["~length:less"]),
        ("has longer sleeves", ["~sleeve:more"]),  # not a length comparative
        ("has shorter sleeves and is longer", ["~length:more", "~sleeve:less"]),
        ("is more casual", ["~formality:less"]),  # casual is the low end of formality
        ("is less casual", ["~formality:more"]),
        ("is tighter", ["~fit:more"]),
        ("is more fitted", ["~fit:more"]),
        ("is looser", ["~fit:less"]),
        ("is brighter", ["~colorfulness:more"]),
        ("is more colorful", ["~colorfulness:more"]),
        ("is less revealing", ["~revealing:less"]),
        ("is sexier", ["~revealing:more"]),
    ],
)
def test_comparatives(text, expected):
    assert got(text) == expected


@pytest.mark.parametrize(
    "a, b",
    [
        ("is gray", "is grey"),
        ("is grey colored", "is gray in colour"),
        ("has a V-neck", "has a v neck"),
        ("is sleeveless", "has no sleeves"),
        ("has 3/4 sleeves", "has three-quarter sleeves"),
        ("is checkered", "is plaid"),
        ("has polka dots", "is polka-dot"),
        ("is navy", "is blue"),
        ("is long-sleeved", "has long sleeves"),
        ("IS RED!", "is red"),
        ("is tighter", "is more form-fitting"),
    ],
)
def test_synonyms_and_spelling(a, b):
    assert got(a) == got(b) != []


@pytest.mark.parametrize(
    "text, expected",
    [
        # real FashionIQ train captions (cap.*.train.json), exact output
        ("is solid black with no sleeves", ["+color:black", "+pattern:solid", "+sleeve:sleeveless"]),
        ("is black with straps", ["+color:black", "-straps:strapless"]),
        ("is lighter and longer", ["~length:more", "~shade:less"]),
        ("has short sleeve and is black color", ["+color:black", "+sleeve:short"]),
        ("is grey with shorter sleeves", ["+color:grey", "~sleeve:less"]),
        ("Is a darker grey", ["+color:grey", "~shade:more"]),
        ("has no sleeves and is light pink", ["+color:pink", "+shade:light", "+sleeve:sleeveless"]),
        ("is sleeveless and has brighter colors", ["+sleeve:sleeveless", "~colorfulness:more"]),
        ("Is lighter with a floral print and sleeveless.", ["+pattern:floral", "+sleeve:sleeveless", "~shade:less"]),
        ("is a blue tank-top", ["+color:blue", "+sleeve:sleeveless"]),
        ("is pink and more casual", ["+color:pink", "~formality:less"]),
        ("is yellow and doesn't have a collar", ["+color:yellow", "-collar:collar"]),
        ("is the same exact shirt", []),
    ],
)
def test_real_fashioniq_captions(text, expected):
    assert got(text) == expected


def test_synthetic_phrases_parse_exactly():
    """Every caption phrase the synthetic world writes names exactly its group and new value."""
    for g, values in GROUPS.items():
        order = list(values)
        for old, new in itertools.permutations(values, 2):
            for style in range(6):
                req = extract(phrase(g, old, new, style))
                assert req.groups == {g} and not req.negative, (phrase(g, old, new, style), req)
                if g in req.comparative:
                    up = order.index(new) > order.index(old)
                    assert req.comparative[g] == ("more" if up else "less") and g not in req.positive
                else:
                    assert req.positive[g] == {new}


def test_synthetic_captions_match_ground_truth(synth_work):
    """On a generated world: each caption names exactly the groups the plan changed, positive
    values are the target's, comparatives point the right way, and requested_status on the target
    (with the reference for comparatives) is True for every group."""
    ws = Workspace(synth_work)
    gallery, trips = ws.load("train")
    cfg = SynthConfig(**{k: v for k, v in ws.manifest()["synthetic"].items() if k in SynthConfig.__dataclass_fields__})
    changed = plan(cfg).changed
    attrs = dict(zip(gallery.image_ids.tolist(), gallery.attributes))
    order = {g: list(v) for g, v in GROUPS.items()}
    for j in range(len(trips)):
        ref_attrs, tgt_attrs = attrs[trips.ref_ids[j]], attrs[trips.target_ids[j]]
        ref, tgt = group_values(ref_attrs), group_values(tgt_attrs)
        for caption in trips.captions[j]:
            req = extract(caption)
            assert req.groups == {g for g, c in zip(GROUPS, changed[j]) if c} and not req.negative, caption
            for g, vals in req.positive.items():
                assert vals == tgt[g], caption
            for g, d in req.comparative.items():
                rank = lambda s: order[g].index(next(iter(s)))
                assert (rank(tgt[g]) > rank(ref[g])) == (d == "more"), caption
            status = requested_status(tgt_attrs, req, ref_attrs=ref_attrs)
            assert all(s is True for s in status.values()), (caption, status)


# ------------------------------------------------------------------------------------------------
# requested_status: synthetic groups and FashionIQ tag groups


def test_requested_status_on_fashioniq_tags():
    req = extract("is sleeveless and red with no stripes")
    tank = ["category:tank", "category:top", "fabric:cotton", "style:red"]
    assert requested_status(tank, req) == {"sleeve": True, "color": True, "pattern": None}
    # sleeve is exclusive (one value per item); colour tags are partial (a pink item may be red too)
    long_striped = ["part:long sleeve", "texture:striped", "style:pink"]
    assert requested_status(long_striped, req) == {"sleeve": False, "color": None, "pattern": False}
    assert requested_status(["fabric:wash", "part:hem"], req) == {"sleeve": None, "color": None, "pattern": None}
    # pattern: only values that exclude each other contradict
    assert requested_status(["texture:print"], extract("is solid")) == {"pattern": False}
    assert requested_status(["texture:floral"], extract("is solid")) == {"pattern": False}
    assert requested_status(["texture:print"], extract("has a graphic")) == {"pattern": None}
    assert requested_status(["texture:graphic"], extract("has white text")) == {"pattern": None, "color": None}
    assert requested_status(["style:solid"], extract("has a pattern")) == {"pattern": False}
    assert requested_status(["style:solid"], extract("is not striped")) == {"pattern": True}
    assert requested_status(["texture:floral"], extract("is not striped")) == {"pattern": None}
    assert requested_status(["texture:striped"], extract("is not striped")) == {"pattern": False}
    # partial groups: another fabric tag does not contradict; an exclusive neckline does
    assert requested_status(["fabric:cotton"], extract("is lace")) == {"fabric": None}
    assert requested_status(["fabric:lace"], extract("is lace")) == {"fabric": True}
    assert requested_status(["part:scoop"], extract("has a v-neck")) == {"neckline": False}
    # comparatives on tags: coarse, so equal tags cannot tell
    longer = extract("has longer sleeves")
    assert requested_status(["part:long sleeve"], longer, ref_attrs=["part:sleeveless"]) == {"sleeve": True}
    assert requested_status(["part:sleeveless"], longer, ref_attrs=["part:long sleeve"]) == {"sleeve": False}
    assert requested_status(["part:long sleeve"], longer, ref_attrs=["part:long-sleeve"]) == {"sleeve": None}


def test_requested_status_synthetic_and_comparatives():
    img = ["color:red", "sleeve:short", "pattern:solid", "length:mini", "neckline:v-neck"]
    assert requested_status(img, extract("is red and has long sleeves")) == {"color": True, "sleeve": False}
    assert requested_status(img, extract("is blue and not solid")) == {"color": False, "pattern": False}
    assert requested_status(img, extract("is not striped")) == {"pattern": True}
    req = extract("is longer")
    assert requested_status(img, req) == {"length": None}  # no reference: cannot tell
    assert requested_status(img, req, ref_attrs=["length:midi"]) == {"length": False}
    assert requested_status(["length:maxi"], req, ref_attrs=["length:midi"]) == {"length": True}
    assert requested_status(["length:midi"], req, ref_attrs=["length:midi"]) == {"length": False}  # exact: not longer
    assert requested_status(img, Requested()) == {}
    # a hand-made request on a group the vocabulary lacks reads the raw attributes
    odd = Requested(positive={"tag": frozenset({"x"})})
    assert requested_status(["tag:x"], odd) == {"tag": True}
    assert requested_status(["tag:y"], odd) == {"tag": False}
    assert requested_status(img, odd) == {"tag": None}


def test_gallery_mapping_names_real_fiq_proxy_tags(fiq_proxy):
    gallery = pq.read_table(fiq_proxy / "gallery.train.parquet", columns=["attributes"])
    tags = {a for row in gallery.column("attributes").to_pylist() for a in row}
    spec = json.loads(DEFAULT_VOCABULARY.read_text())
    named = {a for grp in spec["groups"].values() for v in grp["values"].values() for a in v.get("gallery", [])}
    assert named and not sorted(named - tags)


# ------------------------------------------------------------------------------------------------
# Vocabulary files


def _write(tmp_path, obj, name="vocab.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def _minimal(**group):
    return {
        "format": "cir-mine vocabulary 1",
        "negators": ["no"],
        "groups": {"hue": {"values": {"teal": {"phrases": ["teal", "sea green"], "gallery": ["style:teal"]}}, **group}},
    }


def test_custom_vocabulary(tmp_path):
    v = Vocabulary.load(_write(tmp_path, _minimal()))
    assert extract("is sea-green, no teal", v).as_strings() == ["+hue:teal", "-hue:teal"]
    assert extract("is red", v).as_strings() == []
    assert requested_status(["style:teal"], extract("is teal", v), vocab=v) == {"hue": True}
    assert [r.as_strings() for r in extract_many(["teal", "red"], v)] == [["+hue:teal"], []]


FIX = "Fix the vocabulary file (the shipped miner/core/vocabulary.json shows the format) or pass another one."


@pytest.mark.parametrize(
    "obj, what",
    [
        ('{"format": "cir-mine vocabulary 1", "groups": {', None),
        ({"format": "other", "groups": {}}, "'format' must be 'cir-mine vocabulary 1', found 'other'"),
        ({"format": "cir-mine vocabulary 1"}, "'groups' must be a non-empty object (group -> {values: ...})"),
        (
            {"format": "cir-mine vocabulary 1", "groups": {"g": {"values": {"x": {}}}}},
            "value g:x has no 'phrases' list",
        ),
        (
            {"format": "cir-mine vocabulary 1", "groups": {"g": {"values": {"x": {"phrases": "x"}}}}},
            "g:x 'phrases' must be a list of non-empty strings",
        ),
        (
            {
                "format": "cir-mine vocabulary 1",
                "groups": {"g": {"values": {"x": {"phrases": ["a"]}, "y": {"phrases": ["A"]}}}},
            },
            "phrase 'a' is used twice (g:x and g:y); keep each phrase in one place",
        ),
        (_minimal(), None),
    ],
)
def test_vocabulary_file_errors(tmp_path, obj, what):
    p = _write(tmp_path, obj)
    if obj == _minimal():
        bad = _minimal()
        bad["groups"]["hue"]["order"] = ["teal", "cyan"]
        p = _write(tmp_path, bad)
        what = "group 'hue' 'order' names unknown value 'cyan'; list only the group's values"
    with pytest.raises(DataError) as e:
        Vocabulary.load(p)
    if what is None:
        assert str(e.value).startswith(f"{p}: malformed JSON at line 1")
    else:
        assert str(e.value) == f"{p}: {what}. {FIX}"


def test_cli_attributes(tmp_path):
    runner = CliRunner()
    r = runner.invoke(mine_app, ["attributes", "is red with no sleeves", "is darker"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == ["is red with no sleeves\t+color:red +sleeve:sleeveless", "is darker\t~shade:more"]
    p = _write(tmp_path, {"format": "cir-mine vocabulary 1", "groups": []})
    r = runner.invoke(mine_app, ["attributes", "x", "--vocabulary", str(p)])
    assert r.exit_code == 1
    assert r.output.strip() == f"Error: {p}: 'groups' must be a non-empty object (group -> {{values: ...}}). {FIX}"


# ------------------------------------------------------------------------------------------------
# attr_overlap

attr_lists = st.lists(st.sampled_from([f"{g}:{v}" for g, vs in GROUPS.items() for v in vs[:3]]), max_size=8)


@given(attr_lists, attr_lists)
def test_attr_overlap_properties(a, b):
    o = attr_overlap(a, b)
    assert 0.0 <= o <= 1.0
    assert o == attr_overlap(b, a)
    assert (o == 1.0) == (bool(a) and set(a) == set(b))
    assert (o == 0.0) == (not set(a) & set(b))


def test_group_values():
    assert group_values(["color:red", "color:blue", "solo"]) == {"color": {"red", "blue"}, "tag": {"solo"}}
