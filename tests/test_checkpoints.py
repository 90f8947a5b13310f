"""embed --pretrained reads the checkpoints CIR users hold (OpenAI TorchScript archives, CLIP4Cir's
{'CLIP': state_dict}, open_clip checkpoints, state dicts), builds the -quickgelu model OpenAI-trained
weights need, shows every kind of key mismatch; --preprocess targetpad|squarepad as CLIP4Cir's.
Tiny open_clip configs with random weights (no downloads)."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import DataError
from cir_mine.miner.encode.clip import EncoderConfig, embed_texts, forward_images, load_encoder, read_checkpoint
from tests.fixtures import TINY_CLIP, make_fashioniq, write_png

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_config(folder: Path, name: str, quick_gelu: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({**TINY_CLIP, **({"quick_gelu": True} if quick_gelu else {})}))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Config files: ``ckpt-tiny`` (GELU) and ``ckpt-tinyq`` (QuickGELU, the OpenAI-style source
    model); the source model's weights saved in each layout."""
    import open_clip

    d = tmp_path_factory.mktemp("ckpt")
    gelu, quick = write_config(d / "cfg", "ckpt-tiny"), write_config(d / "cfg", "ckpt-tinyq", quick_gelu=True)
    open_clip.add_model_config(quick)
    torch.manual_seed(7)
    source = open_clip.create_model("ckpt-tinyq").eval()
    sd = source.state_dict()
    files = {
        "state_dict": d / "sd.pt",
        "clip4cir": d / "tuned_clip_best.pt",
        "open_clip": d / "epoch_3.pt",
        "torchscript": d / "ViT-tiny.pt",
        "combiner": d / "combiner.pt",
    }
    torch.save(sd, files["state_dict"])
    torch.save({"epoch": 3, "CLIP": sd}, files["clip4cir"])  # clip_fine_tune.py
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, files["open_clip"])
    torch.save({"epoch": 3, "Combiner": {"w": torch.zeros(2)}}, files["combiner"])
    torch.jit.trace(OpenAIArchive(source), (torch.zeros(1, 3, 32, 32),), check_trace=False).save(
        str(files["torchscript"])
    )
    return {"gelu": gelu, "quick": quick, "source": source, "files": files, "dir": d}


class OpenAIArchive(torch.nn.Module):
    """A TorchScript archive shaped like OpenAI's: the CLIP tensors at the top level, plus the
    ``input_resolution``, ``context_length`` and ``vocab_size`` buffers."""

    def __init__(self, clip):
        super().__init__()
        for n, c in clip.named_children():
            self.add_module(n, c)
        for n, p in clip.named_parameters(recurse=False):
            self.register_parameter(n, p)
        for n, v in (("input_resolution", 32), ("context_length", 32), ("vocab_size", 49408)):
            self.register_buffer(n, torch.tensor(v))

    def forward(self, image):
        return self.visual(image)


def same_embeddings(encoder, source):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.nn.functional.normalize(source.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(forward_images(encoder, x), want, atol=1e-5)
    import open_clip

    tokens = open_clip.get_tokenizer("ckpt-tinyq")(["is red with short sleeves"])
    with torch.no_grad():
        want = torch.nn.functional.normalize(source.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(embed_texts(encoder, ["is red with short sleeves"]), want, atol=1e-5)


@pytest.mark.parametrize("layout", ["state_dict", "clip4cir", "open_clip", "torchscript"])
def test_every_layout_loads_into_the_quickgelu_model(models, layout):
    path = models["files"][layout]
    ckpt = read_checkpoint(path)
    assert ckpt.layout == layout and ckpt.openai == (layout in ("clip4cir", "torchscript"))
    assert not any(k.startswith("module.") or k in ("input_resolution", "vocab_size") for k in ckpt.state_dict)
    enc = load_encoder(EncoderConfig(str(models["quick"]), str(path), "cpu"))
    same_embeddings(enc, models["source"])


def test_openai_weights_pick_the_quickgelu_variant(models, caplog):
    """A GELU model name whose -quickgelu variant open_clip knows: that variant is built and recorded."""
    import open_clip

    write_config(models["dir"] / "v", "ckpt-tiny-quickgelu", quick_gelu=True)
    open_clip.add_model_config(models["dir"] / "v" / "ckpt-tiny-quickgelu.json")
    plain = write_config(models["dir"] / "v", "ckpt-tiny")
    for layout in ("clip4cir", "torchscript"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cir_mine"):
            enc = load_encoder(EncoderConfig(str(plain), str(models["files"][layout]), "cpu"))
        assert enc.name == "ckpt-tiny-quickgelu" and enc.describe()["name"] == "ckpt-tiny-quickgelu"
        assert "which use QuickGELU: embedding with ckpt-tiny-quickgelu, not ckpt-tiny" in caplog.text
        same_embeddings(enc, models["source"])
    # a state dict of unknown origin loads into the model as named
    assert load_encoder(EncoderConfig(str(plain), str(models["files"]["state_dict"]), "cpu")).name == "ckpt-tiny"


def test_openai_weights_without_a_quickgelu_model_are_refused(models, tmp_path):
    gelu = write_config(tmp_path, "solo-tiny")
    path = models["files"]["clip4cir"]
    r = runner.invoke(
        mine_app,
        [
            "embed",
            "--dataset",
            "fashioniq",
            "--root",
            str(make_fashioniq(tmp_path / "f")),
            "--work",
            str(tmp_path / "w"),
            "--model",
            str(gelu),
            "--pretrained",
            str(path),
            "--device",
            "cpu",
            "--workers",
            "0",
            "-q",
        ],
    )
    assert r.exit_code == 2, r.output
    assert r.output.strip() == (
        f"Error: --pretrained {path} holds OpenAI-trained weights (CLIP4Cir's {{'CLIP': ...}} layout, a fine-tuned "
        f"OpenAI CLIP), which use QuickGELU activations, but --model solo-tiny uses GELU and open_clip has no "
        f'solo-tiny-quickgelu: add "quick_gelu": true to {gelu.resolve()}.'
    )
    assert not (tmp_path / "w" / "gallery.train.parquet").exists()


def test_a_key_mismatch_names_every_kind(models, tmp_path):
    sd = dict(models["source"].state_dict())
    del sd["logit_scale"]
    sd["extra.weight"] = torch.zeros(3)
    sd["text_projection"] = torch.zeros(32, 16)
    path = tmp_path / "odd.pt"
    torch.save(sd, path)
    r = runner.invoke(
        mine_app,
        [
            "embed",
            "--dataset",
            "fashioniq",
            "--root",
            str(make_fashioniq(tmp_path / "f")),
            "--work",
            str(tmp_path / "w"),
            "--model",
            str(models["quick"]),
            "--pretrained",
            str(path),
            "--device",
            "cpu",
            "--workers",
            "0",
            "-q",
        ],
    )
    assert r.exit_code == 1, r.output
    assert r.output.strip() == (
        f"Error: --pretrained {path}: the checkpoint (state_dict) does not fit ckpt-tinyq: 1 of its 38 tensors "
        f"missing (logit_scale); 1 tensors it does not have (extra.weight); 1 of another shape (text_projection "
        f"[32, 16] in the checkpoint, [32, 32] in ckpt-tinyq). Pass as --model the architecture the checkpoint was "
        f"trained as."
    )
    with pytest.raises(DataError) as e:
        read_checkpoint(models["files"]["combiner"])
    assert str(e.value).endswith("It holds a CLIP4Cir Combiner: pass the CLIP checkpoint (tuned_clip_*.pt) instead.")


# ------------------------------------------------------------------------------------------------
# --preprocess


def test_targetpad_and_squarepad_by_hand():
    from PIL import Image

    from cir_mine.miner.encode.preprocess import PadToRatio

    wide = Image.new("RGB", (40, 20), (255, 255, 255))
    # ratio 2 >= 1.25: the short side is padded to 40 / 1.25 = 32, 6 black rows above and below
    a = np.asarray(PadToRatio(1.25)(wide))
    assert a.shape == (32, 40, 3) and (a[:6] == 0).all() and (a[26:] == 0).all() and (a[6:26] == 255).all()
    near = Image.new("RGB", (24, 20), (255, 255, 255))  # ratio 1.2 < 1.25: untouched
    assert PadToRatio(1.25)(near) is near
    sq = np.asarray(PadToRatio(1.0, always=True)(wide))  # squarepad: 10 rows above and below
    assert sq.shape == (40, 40, 3) and (sq[:10] == 0).all() and (sq[30:] == 0).all() and (sq[10:30] == 255).all()


def test_embed_with_targetpad_records_it_and_embeds_padded_images(models, tmp_path):
    from PIL import Image

    root = make_fashioniq(tmp_path / "f")
    write_png(root / "images" / "B000000000.png", (200, 30, 30), size=48)
    Image.open(root / "images" / "B000000000.png").crop((0, 0, 48, 24)).save(root / "images" / "B000000000.png")
    work = tmp_path / "w"
    r = runner.invoke(
        mine_app,
        [
            "embed",
            "--dataset",
            "fashioniq",
            "--root",
            str(root),
            "--work",
            str(work),
            "--model",
            str(models["quick"]),
            "--pretrained",
            str(models["files"]["clip4cir"]),
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
    from cir_mine import Workspace

    m = Workspace(work).manifest()
    assert m["encoder"]["preprocess"] == "targetpad:1.25" and m["encoder"]["name"] == "ckpt-tinyq"
    g, _ = Workspace(work).load("train")
    enc = load_encoder(EncoderConfig(str(models["quick"]), str(models["files"]["clip4cir"]), "cpu"))
    # by hand: 48x24 (ratio 2) padded to 48x38, resized to a short side of 32, centre-cropped to 32x32
    im = Image.open(root / "images" / "B000000000.png").convert("RGB")
    padded = Image.new("RGB", (48, 38))
    padded.paste(im, (0, 7))
    x = enc.preprocess(padded)[None]  # clip preprocess of the hand-padded image
    row = int(np.flatnonzero(g.image_ids == "B000000000")[0])
    np.testing.assert_allclose(g.embeddings[row], forward_images(enc, x)[0], atol=1e-5)
    assert not np.allclose(g.embeddings[row], forward_images(enc, enc.preprocess(im)[None])[0], atol=1e-3)
    r = runner.invoke(
        mine_app,
        [
            "embed",
            "--dataset",
            "fashioniq",
            "--root",
            str(root),
            "--work",
            str(tmp_path / "x"),
            "--model",
            str(models["quick"]),
            "--preprocess",
            "letterbox",
            "-q",
        ],
    )
    assert r.exit_code == 2 and r.output.strip() == "Error: --preprocess 'letterbox': use clip, targetpad, squarepad."


def test_the_cli_defaults_are_the_config_defaults():
    import inspect

    from cir_mine.cli import embed

    params = inspect.signature(embed).parameters
    assert params["target_ratio"].default.default == EncoderConfig.target_ratio == 1.25
    assert params["preprocess"].default.default == EncoderConfig.preprocess == "clip"


@pytest.mark.slow
def test_random_weights_warn_even_when_quiet(tmp_path):
    cfg = write_config(tmp_path / "cfg", "warn-tiny")
    root = make_fashioniq(tmp_path / "f")
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from cli import mine_main; mine_main()",
            "embed",
            "--dataset",
            "fashioniq",
            "--root",
            str(root),
            "--work",
            str(tmp_path / "w"),
            "--model",
            str(cfg),
            "--pretrained",
            "none",
            "--device",
            "cpu",
            "--workers",
            "0",
            "-q",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == (
        "WARNING cir_mine.miner.encode.model: pretrained none: random weights. Their embeddings, and any negatives "
        "mined from them, are meaningless; they only try out the pipeline. Pass a trained checkpoint for real "
        "negatives (a local file: OpenAI's .pt, CLIP4Cir's tuned_clip_*.pt, an open_clip checkpoint; or an "
        "open_clip tag)."
    )
