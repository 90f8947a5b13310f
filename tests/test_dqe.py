"""The DQE model option: shapes, the attribute-aware margin loss against a loop, one training step."""

import numpy as np
import pytest
import torch

from cir_mine.data.errors import UsageError
from cir_mine.train.loss import attribute_margin
from cir_mine.train.model import ATTR_HEADS, ModelConfig, attribute_head_codes, build_model


def test_dqe_shapes_and_weights():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="dqe", dim=16, width=0.5))
    ref, txt = torch.randn(5, 16), torch.randn(5, 16)
    out, subs, w = model.parts(ref, txt)
    assert out.shape == (5, 16) and subs.shape == (5, len(ATTR_HEADS), 16) and w.shape == (5, 1 + len(ATTR_HEADS))
    assert torch.allclose(out.norm(dim=-1), torch.ones(5)) and torch.allclose(subs.norm(dim=-1), torch.ones(5, 2))
    assert torch.allclose(w.sum(-1), torch.ones(5)) and (w > 0).all()
    model.eval()
    assert torch.equal(model(ref, txt), model.parts(ref, txt)[0])
    with pytest.raises(UsageError, match="attribute heads size"):
        build_model(ModelConfig(kind="dqe", dim=16, attr_heads=("size",)))


def test_attribute_head_codes():
    attrs = [["color:red", "sleeve:long"], ["color:red", "sleeve:short"], ["color:blue", "sleeve:long"], []]
    codes = attribute_head_codes(attrs, ("color", "shape"))
    assert codes.shape == (4, 2)
    assert codes[0, 0] == codes[1, 0] != codes[2, 0] and codes[0, 1] == codes[2, 1] != codes[1, 1]
    assert codes[3, 0] not in codes[:3, 0]


def test_attribute_margin_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    B, C, S, d = 3, 4, 2, 8
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)
    subs, t, cand = unit(B, S, d), unit(B, d), unit(B, C, d)
    w = torch.softmax(torch.randn(B, S + 1, generator=g), -1)
    differs = torch.rand(B, C, S, generator=g) > 0.4
    total, n = 0.0, 0
    for b in range(B):
        for c in range(C):
            for s in range(S):
                if differs[b, c, s]:
                    m = 0.2 * (1 + S * float(w[b, 1 + s]))
                    total += max(0.0, m + float(subs[b, s] @ cand[b, c]) - float(subs[b, s] @ t[b]))
                    n += 1
    assert abs(float(attribute_margin(subs, w, t, cand, differs, 0.2)) - total / n) < 1e-5
    assert float(attribute_margin(subs, w, t, cand, torch.zeros_like(differs), 0.2)) == 0.0


def test_dqe_training_step_and_checkpoint_hook(synth_work, tmp_path):
    from cir_mine.data.workspace import Workspace
    from cir_mine.miner.core.mine import MineConfig, mine_to_file
    from cir_mine.train.loop import TrainConfig, Trainer, load_query_encoder, train

    negs = tmp_path / "negs.parquet"
    mine_to_file(Workspace(synth_work), "train", MineConfig(strategy="hardest", k=3, device="cpu"), negs)
    cfg = TrainConfig(
        work=str(synth_work),
        out=str(tmp_path / "run"),
        negatives=str(negs),
        model="dqe",
        epochs=1,
        batch_size=64,
        width=0.5,
        threads=1,
    )
    tr = Trainer(cfg.validate())
    tr.load_bank(str(negs))
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    loss = tr.train_epoch(0)
    assert np.isfinite(loss) and loss > 0
    after = tr.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in ("weights.weight", "output.weight"))
    # the attribute term is part of the loss: without it the same epoch gives another loss
    tr2 = Trainer(TrainConfig(**{**cfg.to_dict(), "attr_weight": 0.0, "out": str(tmp_path / "run2")}))
    tr2.load_bank(str(negs))
    assert abs(tr2.train_epoch(0) - loss) > 1e-4
    m = train(cfg)
    assert m["model"] == "dqe" and 0 <= m["R@10"] <= 100
    g, t = Workspace(synth_work).load("train")
    enc = load_query_encoder(tmp_path / "run" / "ckpt.pt")
    q = enc(g.embeddings[:4], t.text_embeddings[:4])
    assert q.shape == (4, g.dim) and np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)


def test_group_heads_one_sub_query_per_group():
    """A "group:NAME" head answers for that group alone: two images differ for it exactly when
    their values of that group differ."""
    attrs = [["color:red", "neckline:v"], ["color:red", "neckline:crew"], ["color:blue", "neckline:v"]]
    codes = attribute_head_codes(attrs, ("group:color", "group:neckline", "shape"))
    assert codes[0, 0] == codes[1, 0] != codes[2, 0]
    assert codes[0, 1] == codes[2, 1] != codes[1, 1]
    assert (codes[:, 2] == codes[:, 1]).all()  # neckline is the only shape group tagged here
    model = build_model(
        ModelConfig(kind="dqe", dim=16, width=0.5, attr_heads=("group:color", "group:neckline", "shape"))
    )
    out, subs, w = model.parts(torch.randn(3, 16), torch.randn(3, 16))
    assert subs.shape == (3, 3, 16) and w.shape == (3, 4)
    with pytest.raises(UsageError, match=r"^attribute heads group:: use one or more of color, shape or group:NAME"):
        build_model(ModelConfig(kind="dqe", dim=16, attr_heads=("group:",)))


def test_attr_heads_option_resolves_against_the_gallery():
    from cir_mine.train.loop import TrainConfig, resolve_heads

    attrs = [["color:red", "sleeve:long"], ["neckline:v"], []]
    assert resolve_heads(("groups",), attrs) == ("group:color", "group:neckline", "group:sleeve")
    assert resolve_heads(("color", "group:sleeve"), attrs) == ("color", "group:sleeve")
    with pytest.raises(
        UsageError,
        match=r"^attribute heads group:length: no gallery image has a tag of that group "
        r"\(its groups: color, neckline, sleeve\)\.$",
    ):
        resolve_heads(("group:length",), attrs)
    with pytest.raises(UsageError, match=r"^attr_heads groups: the gallery has no attribute tags"):
        resolve_heads(("groups",), [[], []])
    assert TrainConfig(work="-", out="-", model="dqe", attr_heads="color, group:neckline").validate().heads() == (
        "color",
        "group:neckline",
    )
    with pytest.raises(
        UsageError,
        match=r"^attr_heads needs dqe as the model \(model is combiner\): pass model dqe, or leave attr_heads out\.$",
    ):
        TrainConfig(work="-", out="-", attr_heads="groups").validate()
    with pytest.raises(UsageError, match="attribute heads size"):
        TrainConfig(work="-", out="-", model="dqe", attr_heads="color,size").validate()


def test_dqe_group_heads_train_and_reload(synth_work, tmp_path):
    """--attr-heads groups: one head per synthetic attribute group; the checkpoint rebuilds them."""
    from cir_mine.data.workspace import Workspace
    from cir_mine.train.loop import TrainConfig, load_query_encoder, train

    cfg = TrainConfig(
        work=str(synth_work),
        out=str(tmp_path / "run"),
        model="dqe",
        attr_heads="groups",
        epochs=1,
        batch_size=64,
        width=0.5,
        threads=1,
    )
    m = train(cfg)
    assert m["model"] == "dqe" and 0 <= m["R@10"] <= 100
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    heads = saved["model_config"]["attr_heads"]
    g, t = Workspace(synth_work).load("train")
    groups = sorted({a.split(":", 1)[0] for tags in g.attributes for a in tags})
    assert len(groups) >= 3 and tuple(heads) == tuple("group:" + x for x in groups)
    enc = load_query_encoder(tmp_path / "run" / "ckpt.pt")
    assert enc(g.embeddings[:4], t.text_embeddings[:4]).shape == (4, g.dim)


def test_cir_train_attr_heads_errors(synth_work, tmp_path):
    """The CLI names the flags, exits 2 and writes no run."""
    from typer.testing import CliRunner

    from cir_mine.cli import train_app

    runner = CliRunner()
    r = runner.invoke(train_app, ["--work", str(synth_work), "--out", str(tmp_path / "r"), "--attr-heads", "groups"])
    assert r.exit_code == 2 and r.output.strip() == (
        "Error: --attr-heads needs dqe as the --model (--model is combiner): "
        "pass --model dqe, or leave --attr-heads out."
    )
    r = runner.invoke(
        train_app,
        ["--work", str(synth_work), "--out", str(tmp_path / "r"), "--model", "dqe", "--attr-heads", "group:size"],
    )
    assert r.exit_code == 2 and r.output.strip().startswith(
        "Error: attribute heads group:size: no gallery image has a tag of that group"
    )
    assert not (tmp_path / "r").exists()
