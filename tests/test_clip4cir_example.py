"""examples/clip4cir runs as CLIP4Cir's combiner loop would with cir-mine: the fixture, `cir-mine embed`
with CLIP4Cir's checkpoint and target-pad transform, two epochs with a re-mine between them; every item
of every batch carries its own query's negatives, and the cir-mine glue stays within 15 lines."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cir_mine import Workspace
from cir_mine.cli import mine_app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "clip4cir"
runner = CliRunner()


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for name in ("combiner_train", "combiner", "data_utils", "fixture"):
        sys.modules.pop(name, None)
    import combiner_train
    import fixture

    yield combiner_train, fixture
    for name in ("combiner_train", "combiner", "data_utils", "fixture"):
        sys.modules.pop(name, None)


def test_the_glue_is_at_most_15_lines():
    lines = [x for x in (EXAMPLE / "combiner_train.py").read_text().splitlines() if x.rstrip().endswith("# cir-mine")]
    assert 5 <= len(lines) <= 15, lines


@pytest.mark.slow
def test_every_item_gets_its_own_querys_negatives(example, tmp_path):
    combiner_train, fixture = example
    torch.set_num_threads(1)
    paths = fixture.make_fixture(tmp_path)
    work = tmp_path / "work"
    r = runner.invoke(
        mine_app,
        [
            "embed",
            "--dataset",
            "fashioniq",
            "--root",
            str(paths["root"]),
            "--split",
            "train",
            "--work",
            str(work),
            "--model",
            str(paths["config"]),
            "--pretrained",
            str(paths["checkpoint"]),
            "--preprocess",
            "targetpad",
            "--device",
            "cpu",
            "--workers",
            "0",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    ws = Workspace(work)
    g, t = ws.load("train")

    # what each item is, from the caption files themselves, in CLIP4Cir's dress order
    items = {}
    for cat in ("dress", "toptee", "shirt"):
        for j, e in enumerate(json.loads((paths["root"] / "captions" / f"cap.{cat}.train.json").read_text())):
            items[tuple(e["captions"])] = (f"{cat}-train-{j:05d}", cat, e["candidate"], e["target"])
    assert len(items) == len(t) == 16 * 2 * 3 + 1

    batches = []
    out = combiner_train.combiner_training_fiq(
        str(paths["root"]),
        str(work),
        str(paths["config"]),
        str(paths["checkpoint"]),
        num_epochs=2,
        batch_size=16,
        k=4,
        remine_every=1,
        on_batch=batches.append,
    )
    assert len(out["rounds"]) == 2 and [r.meta["round"] for r in out["rounds"]] == [0, 1]
    assert all(np.isfinite(out["losses"]))

    def negatives(res) -> dict:
        per = {}
        for row in res.table.to_pylist():
            per.setdefault(row["query_id"], []).append((row["neg_category"], row["neg_id"]))
        return per

    rounds = [negatives(r) for r in out["rounds"]]
    seen, with_negs = set(), 0
    for b in batches:
        want_round = rounds[b["epoch"]]
        for i, caps in enumerate(zip(*b["captions"])):
            qid, cat, ref, target = items[caps]
            seen.add((b["epoch"], qid))
            want = want_round.get(qid, [])
            mask = b["neg_mask"][i].numpy()
            assert mask.tolist() == [j < len(want) for j in range(4)], qid
            rows = g.rows([n for _, n in want], [c for c, _ in want])
            np.testing.assert_array_equal(b["neg_features"][i].numpy()[mask], g.embeddings[rows])
            assert not b["neg_features"][i].numpy()[~mask].any()
            assert ref not in [n for _, n in want] and target not in [n for _, n in want]
            with_negs += bool(want)
            # the workspace's reference embedding is the loop's own CLIP feature of that image
            ref_row = g.rows([ref], [cat])[0]
            loop = torch.nn.functional.normalize(b["reference_features"][i], dim=-1).numpy()
            np.testing.assert_allclose(g.embeddings[ref_row], loop, atol=1e-5)
    assert seen == {(e, q) for e in (0, 1) for q, *_ in items.values()}  # every item, every epoch
    assert with_negs > len(items)  # most items carry negatives
    assert rounds[0] != rounds[1]  # the re-mine changed them
