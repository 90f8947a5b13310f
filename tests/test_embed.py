"""cir-mine embed / index through the real open_clip path with a tiny random-weight config (CPU)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data.errors import UsageError
from cir_mine.data.workspace import Workspace
from cir_mine.miner.encode.clip import EncoderConfig, forward_images, load_encoder
from cir_mine.miner.core.search import search_batched
from cir_mine.miner.core.search.persist import load_index
from tests.fixtures import make_cirr, make_fashioniq, make_folder, write_tiny_clip_config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import faiss

    old = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)  # OpenMP spinning on a shared 2-core machine is slow
    yield
    torch.set_num_threads(old[0])
    faiss.omp_set_num_threads(old[1])


@pytest.fixture(scope="module")
def small_work(synth_world) -> Path:
    return synth_world(n_gallery=400, n_triplets=50, dim=32, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_clip_config(tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def encoder(tiny):
    return load_encoder(EncoderConfig(str(tiny), "none", "cpu"))


def embed(args, tiny, *extra):
    r = runner.invoke(
        mine_app, ["embed", *args, "--model", str(tiny), "--device", "cpu", "--workers", "0", "-q", *extra]
    )
    return r


def direct(encoder, path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        x = encoder.preprocess(im.convert("RGB"))[None]
    return forward_images(encoder, x)[0]


@pytest.mark.slow
def test_fashioniq_workspace_loads_and_index_searches(tmp_path, tiny, encoder):
    root, work = make_fashioniq(tmp_path / "fiq"), tmp_path / "w"
    r = embed(
        [
            "--dataset",
            "fashioniq",
            "--root",
            str(root),
            "--split",
            "train",
            "--work",
            str(work),
            "--batch-size",
            "4",
            "--shard-size",
            "8",
        ],
        tiny,
    )
    assert r.exit_code == 0, r.output
    assert "18 images, 15 triplets (d=32, cir-tiny-clip)" in r.output
    ws = Workspace(work)
    g, t = ws.load("train")
    assert len(g) == 18 and len(t) == 15 and g.dim == 32
    m = ws.manifest()
    assert m["source"] == "fashioniq" and m["encoder"] == {
        "name": "cir-tiny-clip",
        "pretrained": "none",
        "dim": 32,
        "library": "open_clip",
        "model": str(tiny.resolve()),
    }
    assert m["embed"]["train"]["skipped_images"]["count"] == 0
    assert not (work / ".embed-train").exists()
    # Dataset tags survive; each row is its own file's embedding.
    assert "fabric:silk" in g.attributes[0]
    for i in (0, 7, 17):
        np.testing.assert_allclose(g.embeddings[i], direct(encoder, root / g.paths[i]), atol=1e-5)
    # FashionIQ text: "c1 and c2" through the CLIP tokenizer.
    from cir_mine.miner.encode.clip import embed_texts

    want = embed_texts(encoder, [" and ".join(c.rstrip(".") for c in t.captions[3])])[0]
    np.testing.assert_allclose(t.text_embeddings[3], want, atol=1e-5)
    index = load_index(ws.index_path("train"), device="cpu")
    assert index.ntotal == len(g)
    D, I = search_batched(index, g.embeddings[:5], k=3)
    assert I[:, 0].tolist() == [0, 1, 2, 3, 4]
    meta = json.loads((work / "index.train.faiss.json").read_text())
    assert meta["gallery_rows"] == 18 and meta["factory"] == "Flat"


def test_corrupt_images_are_skipped_counted_and_never_replaced(tmp_path, tiny, encoder):
    root, work = make_fashioniq(tmp_path / "fiq"), tmp_path / "w"
    (root / "images" / "B000000001.png").write_bytes(b"")  # zero-byte
    data = (root / "images" / "B100000002.png").read_bytes()
    (root / "images" / "B100000002.png").write_bytes(data[: len(data) // 2])  # truncated
    (root / "images" / "B200000003.png").write_bytes(b"not an image at all")  # garbage
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
            str(tiny),
            "--device",
            "cpu",
            "--workers",
            "1",
            "--batch-size",
            "5",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "skipped 3 unreadable image(s), dropped 6 triplet(s)" in r.output
    g, t = Workspace(work).load("train")
    assert len(g) == 15 and len(t) == 9
    skipped = Workspace(work).manifest()["embed"]["train"]["skipped_images"]
    assert skipped["count"] == 3 and skipped["unreadable"] == 3
    assert sorted(s["image_id"] for s in skipped["images"]) == ["B000000001", "B100000002", "B200000003"]
    assert not {"B000000001", "B100000002", "B200000003"} & set(g.image_ids.tolist())
    for i in range(len(g)):
        np.testing.assert_allclose(g.embeddings[i], direct(encoder, root / g.paths[i]), atol=1e-5)


def test_cirr_fixture(tmp_path, tiny):
    root, work = make_cirr(tmp_path / "cirr"), tmp_path / "w"
    r = embed(["--dataset", "cirr", "--root", str(root), "--split", "val", "--work", str(work)], tiny)
    assert r.exit_code == 0, r.output
    g, t = Workspace(work).load("val")
    assert len(g) == 12 and len(t) == 10
    assert t.extra_positive_ids[0] and t.verified_negative_ids[0] and len(t.img_set[0]) == 6


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder_fixture(tmp_path, tiny, fmt):
    root, work = make_folder(tmp_path / "mine", fmt=fmt), tmp_path / "w"
    r = embed(["--dataset", "folder", "--root", str(root), "--split", "train", "--work", str(work)], tiny)
    assert r.exit_code == 0, r.output
    g, t = Workspace(work).load("train")
    assert len(g) == 8 and len(t) == 6
    assert t.ref_ids[0] == "dresses/img000" and t.target_ids[0] == "dresses/img002"
    assert dict(zip(g.image_ids.tolist(), g.categories.tolist()))["tops/img001"] == "top"
    assert t.query_ids[0] == "folder-train-00000"


def test_folder_errors(tmp_path):
    from cir_mine.data.errors import DataError
    from cir_mine.data.folder import load_folder

    root = make_folder(tmp_path / "f")
    (root / "triplets.csv").write_text("ref,target,caption\nnope,tops/img001,is red\n")
    with pytest.raises(DataError, match=r"row 0 'ref' names image 'nope' that is not under"):
        load_folder(root, "train")
    (root / "triplets.csv").unlink()
    with pytest.raises(DataError, match="no triplets file"):
        load_folder(root, "train")


def test_named_weights_fail_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    root = make_folder(tmp_path / "f", n_images=3)
    r = runner.invoke(
        mine_app,
        [
            "embed",
            "--dataset",
            "folder",
            "--root",
            str(root),
            "--work",
            str(tmp_path / "w"),
            "--model",
            "ViT-B-32",
            "--pretrained",
            "laion2b_s34b_b79k",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 1
    assert r.output.strip() == (
        "Error: --pretrained laion2b_s34b_b79k: weights for ViT-B-32 are not cached and the download host is "
        "unreachable (offline). No weights can be downloaded on this machine: pass --pretrained PATH (a local "
        "open_clip checkpoint) or --pretrained none (random weights)."
    )
    r = runner.invoke(
        mine_app,
        [
            "embed",
            "--dataset",
            "folder",
            "--root",
            str(root),
            "--work",
            str(tmp_path / "w"),
            "--model",
            "ViT-B-32",
            "--pretrained",
            "no-such-tag",
        ],
    )
    assert r.exit_code == 2 and "Pass a checkpoint path or none." in r.output
    r = runner.invoke(
        mine_app,
        ["embed", "--dataset", "folder", "--root", str(root), "--work", str(tmp_path / "w"), "--model", "ViT-Q-99"],
    )
    assert r.exit_code == 2 and "not an open_clip model name" in r.output


def test_local_checkpoint_path_loads(tmp_path, tiny, encoder):
    ckpt = tmp_path / "tiny.pt"
    torch.save(encoder.model.state_dict(), ckpt)
    other = load_encoder(EncoderConfig(str(tiny), str(ckpt), "cpu"))
    fresh = load_encoder(EncoderConfig(str(tiny), "none", "cpu", seed=1))
    x = torch.rand(2, 3, 32, 32)
    np.testing.assert_array_equal(forward_images(other, x), forward_images(encoder, x))
    assert not np.allclose(forward_images(fresh, x), forward_images(encoder, x))


def _cli(args, env=None):
    return subprocess.run(
        [sys.executable, "-c", "from cli import mine_main; mine_main()", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, tiny):
    root = make_fashioniq(tmp_path / "fiq")
    (root / "images" / "B100000003.png").write_bytes(b"")
    args = [
        "embed",
        "--dataset",
        "fashioniq",
        "--root",
        str(root),
        "--model",
        str(tiny),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--shard-size",
        "4",
        "-q",
    ]
    killed = tmp_path / "killed"
    r = _cli([*args, "--work", str(killed)], env={"CIR_MINE_CRASH": "embed-saved:2"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    shards = sorted(p.name for p in (killed / ".embed-train").glob("shard-*.npz"))
    assert shards == ["shard-00000.npz", "shard-00001.npz"]
    assert not (killed / "gallery.train.parquet").exists()
    r = _cli([*args, "--work", str(killed), "-v"])
    assert r.returncode == 0, r.stderr
    assert "resuming: 2 of 5 shards already done" in r.stderr
    full = tmp_path / "full"
    r = embed([*args[1:-1], "--work", str(full)], tiny)  # in-process, never interrupted
    assert r.exit_code == 0, r.output
    for name in ("gallery.train.parquet", "triplets.train.parquet"):
        a, b = pq.read_table(killed / name), pq.read_table(full / name)
        assert a.replace_schema_metadata(None).equals(b.replace_schema_metadata(None)), name
    assert Workspace(killed).manifest()["embed"]["train"]["skipped_images"]["count"] == 1


def test_zero_shot_attributes(tmp_path, tiny, encoder):
    from cir_mine.miner.encode.clip import embed_texts

    prompts = tmp_path / "p.json"
    prompts.write_text(
        json.dumps(
            {
                "template": "a photo of a {value} {category}",
                "groups": {
                    "color": ["red", "blue", "black"],
                    "sleeve": {"short": "short-sleeved", "long": "long-sleeved"},
                },
            }
        )
    )
    root, work = make_fashioniq(tmp_path / "fiq", n_per_cat=3), tmp_path / "w"
    r = embed(
        ["--dataset", "fashioniq", "--root", str(root), "--work", str(work), "--attribute-prompts", str(prompts)], tiny
    )
    assert r.exit_code == 0, r.output
    g = Workspace(work).gallery("train")
    scores = pq.read_table(work / "gallery.train.parquet").column("attribute_scores").to_pylist()
    for i in range(len(g)):
        attrs = g.attributes[i]
        assert len(scores[i]) == len(attrs)
        n_tags = sum(1 for a in attrs if not a.startswith(("color:", "sleeve:")))
        assert all(np.isnan(s) for s in scores[i][:n_tags])
        zs = dict(zip(attrs[n_tags:], scores[i][n_tags:]))
        assert [a.split(":")[0] for a in zs] == ["color", "sleeve"]
        texts = [f"a photo of a {v} {g.categories[i]}" for v in ("red", "blue", "black")]
        sims = embed_texts(encoder, texts) @ g.embeddings[i]
        assert attrs[n_tags] == f"color:{['red', 'blue', 'black'][int(np.argmax(sims))]}"
        assert 1 / 3 <= zs[attrs[n_tags]] <= 1.0


def test_default_prompt_file_has_garment_groups():
    from cir_mine.miner.encode.clip import DEFAULT_PROMPTS, load_prompts

    p = load_prompts(DEFAULT_PROMPTS)
    assert set(p.groups) == {"color", "sleeve", "pattern", "length", "neckline", "fit"}


@pytest.mark.parametrize(
    "spec,factory",
    [
        ("flat", "Flat"),
        ("ivf", "IVF80,Flat"),
        ("ivfpq", "IVF80,PQ8"),
        ("hnsw", "HNSW32,Flat"),
        ("IVF16,Flat", "IVF16,Flat"),
    ],
)
def test_index_kinds_build(tmp_path, small_work, spec, factory):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(small_work, work)
    r = runner.invoke(mine_app, ["index", "--work", str(work), "--index", spec, "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"{factory} over 400 images (CPU build)" in r.output
    g = Workspace(work).gallery("train")
    index = load_index(Workspace(work).index_path("train"), device="cpu")
    D, I = search_batched(index, g.embeddings[:50], k=5)
    assert index.ntotal == 400 and (I[:, 0] == np.arange(50)).mean() >= 0.8


def test_index_bad_factory_is_usage_error(tmp_path, small_work):
    r = runner.invoke(mine_app, ["index", "--work", str(small_work), "--index", "Nonsense99", "--device", "cpu"])
    assert r.exit_code == 2 and r.output.startswith("Error: --index 'Nonsense99': FAISS cannot build")


@pytest.mark.parametrize("kind", ["npy", "parquet"])
def test_import_features(tmp_path, kind):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((40, 16)).astype(np.float32) * 3
    ids = [f"img{i}" for i in range(40)]
    work = tmp_path / "w"
    if kind == "npy":
        np.save(tmp_path / "f.npy", emb)
        (tmp_path / "ids.txt").write_text("".join(f"{i}\tdress\n" for i in ids))
        args = ["--from-features", str(tmp_path / "f.npy"), "--ids", str(tmp_path / "ids.txt")]
    else:
        pq.write_table(pa.table({"image_id": ids, "embedding": emb.tolist()}), tmp_path / "f.parquet")
        args = ["--from-features", str(tmp_path / "f.parquet")]
    r = runner.invoke(mine_app, ["index", "--work", str(work), "--device", "cpu", "--encoder-name", "my-clip", *args])
    assert r.exit_code == 0, r.output
    g = Workspace(work).gallery("train")
    assert g.image_ids.tolist() == ids and Workspace(work).manifest()["encoder"]["name"] == "my-clip"
    np.testing.assert_allclose(g.embeddings, emb / np.linalg.norm(emb, axis=1, keepdims=True), atol=1e-6)
    assert load_index(Workspace(work).index_path("train"), device="cpu").ntotal == 40


@pytest.mark.parametrize("index", ["flat", "none"])
def test_import_features_with_npy_writes_the_mapped_embeddings(tmp_path, index):
    """`index --from-features --npy` writes gallery.{split}.npy, as the line it prints says."""
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((30, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", emb)
    (tmp_path / "ids.txt").write_text("".join(f"img{i}\n" for i in range(30)))
    work = tmp_path / "w"
    r = runner.invoke(
        mine_app,
        [
            "index",
            "--work",
            str(work),
            "--device",
            "cpu",
            "--index",
            index,
            "--npy",
            "--from-features",
            str(tmp_path / "f.npy"),
            "--ids",
            str(tmp_path / "ids.txt"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert f"wrote {work}/gallery.train.npy" in r.output
    mapped = np.load(Workspace(work).embeddings_path("train"), mmap_mode="r")
    np.testing.assert_array_equal(mapped, Workspace(work).gallery("train").embeddings)


def test_uint8_workers_then_batched_normalize_equals_open_clip_transform(tmp_path, encoder):
    from PIL import Image

    from cir_mine.miner.encode.clip import ImageFiles, input_shape, normalize_pixels
    from tests.fixtures import write_png

    paths = []
    for i, size in enumerate((32, 47, 80)):
        write_png(tmp_path / f"{i}.png", (200, 30 * i, 90), size=size, seed=i)
        paths.append(str(tmp_path / f"{i}.png"))
    ds = ImageFiles(paths, encoder.pil_transform, input_shape(encoder), uint8=True)
    x = torch.stack([ds[i][0] for i in range(3)])
    assert x.dtype == torch.uint8
    want = torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])
    assert torch.equal(normalize_pixels(x, encoder.mean_std), want)


def test_second_split_with_another_encoder_is_refused(tmp_path, tiny):
    root, work = make_cirr(tmp_path / "cirr", n_images=4), tmp_path / "w"
    assert embed(["--dataset", "cirr", "--root", str(root), "--split", "val", "--work", str(work)], tiny).exit_code == 0
    other = write_tiny_clip_config(tmp_path / "cfg2", name="other-tiny")
    make_cirr(tmp_path / "cirr", split="train", n_images=4)
    r = embed(["--dataset", "cirr", "--root", str(root), "--split", "train", "--work", str(work)], other)
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {work / 'manifest.json'}: splits val were embedded with cir-tiny-clip (pretrained none), not "
        f"other-tiny (pretrained none). Embed into a new --work directory, or use the same --model and --pretrained."
    )
    assert not (work / "gallery.train.parquet").exists()


def test_annotations_without_images_fail_before_loading_a_model(tmp_path):
    root = make_fashioniq(tmp_path / "fiq", images=False)
    r = runner.invoke(
        mine_app,
        [
            "embed",
            "--dataset",
            "fashioniq",
            "--root",
            str(root),
            "--work",
            str(tmp_path / "w"),
            "--model",
            "no-such-model",
        ],
    )
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"Error: {root}: none of the 18 fashioniq images of split 'train' has an image file (annotations only?). "
        f"Put the images where the dataset layout expects them (FashionIQ: ROOT/images/ID.png|.jpg), or import "
        f"features with `cir-mine index --from-features`."
    )


def test_index_refuses_a_locked_workspace(tmp_path, small_work):
    import shutil

    from cir_mine.data.io import DirLock

    work = tmp_path / "w"
    shutil.copytree(small_work, work)
    (work / DirLock.NAME).write_text(
        json.dumps({"pid": 1, "host": __import__("socket").gethostname(), "purpose": "cir-mine embed"})
    )
    r = runner.invoke(mine_app, ["index", "--work", str(work), "--device", "cpu"])
    assert r.exit_code == 1 and "is in use by process 1 (cir-mine embed)" in r.output


def test_positives_embed_captions_with_the_workspace_text_tower(tmp_path, tiny):
    """Generated triplets on an embedded workspace use its own open_clip text tower."""
    from cir_mine.data.workspace import read_triplets
    from cir_mine.miner.encode.clip import text_encoder_from_manifest

    root, work = make_fashioniq(tmp_path / "fiq", n_per_cat=10), tmp_path / "w"
    assert embed(["--dataset", "fashioniq", "--root", str(root), "--work", str(work)], tiny).exit_code == 0
    ws = Workspace(work)
    g, t = ws.load("train")
    encode = text_encoder_from_manifest(ws.manifest(), device="cpu")
    # the rebuilt text tower reproduces the workspace's own caption embeddings
    assert np.allclose(encode([" and ".join(c) for c in t.captions[:3]]), t.text_embeddings[:3], atol=1e-5)
    out = tmp_path / "extra.parquet"
    r = runner.invoke(
        mine_app,
        [
            "positives",
            "--work",
            str(work),
            "--out",
            str(out),
            "--max-diff",
            "3",
            "--max-values",
            "4",
            "--dup-threshold",
            "1.01",
        ],
    )
    assert r.exit_code == 0, r.output
    extra = read_triplets(out, dim=g.dim)
    assert len(extra) > 0
    assert np.allclose(encode([" and ".join(extra.captions[0])]), extra.text_embeddings[:1], atol=1e-5)


# -- the GPU path's settings, exercised on the CPU --------------------------------------------------

TINY_RESNET = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_autocast_and_channels_last_run_on_the_cpu(tmp_path, tiny):
    """bf16 autocast and channels-last input (what a GPU runs) embed on the CPU too: unit rows close
    to the fp32 ones; channels-last follows the architecture (a ResNet's tower, not a ViT's)."""
    from cir_mine.miner.encode.clip import convolutional

    (tmp_path / "cir-tiny-resnet.json").write_text(json.dumps(TINY_RESNET))
    for model in (str(tiny), str(tmp_path / "cir-tiny-resnet.json")):
        ref = load_encoder(EncoderConfig(model, "none", "cpu"))
        fast = load_encoder(EncoderConfig(model, "none", "cpu", precision="bf16", channels_last=True))
        assert ref.amp_dtype is None and not ref.channels_last
        assert fast.amp_dtype == torch.bfloat16 and fast.channels_last
        x = torch.rand(6, 3, 32, 32)
        a, b = forward_images(ref, x), forward_images(fast, x)
        assert np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
        assert (np.einsum("ij,ij->i", a, b) > 0.99).all()
        assert convolutional(ref.model.visual) == model.endswith("resnet.json")


def test_precision_is_checked():
    from cir_mine.miner.encode.clip import autocast_dtype

    with pytest.raises(UsageError, match="precision 'fp8'") as e:
        autocast_dtype("fp8", torch.device("cpu"))
    assert e.value.params == ("precision",)
    assert autocast_dtype("auto", torch.device("cpu")) is None


def test_workers_default_by_device(monkeypatch):
    import os

    from cir_mine.miner.encode.clip import default_workers

    assert default_workers(torch.device("cpu")) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers(torch.device("cuda")) == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers(torch.device("cuda")) == 2


def test_embedding_while_the_last_batch_is_copied_equals_batch_by_batch(tmp_path, encoder):
    """Each batch's embeddings are collected after the next batch is launched: the rows, the shards
    and the skipped image are those of one forward per batch."""
    from cir_mine.miner.encode.clip import ImageRun, embed_images
    from tests.fixtures import write_png

    paths = []
    for i in range(11):
        write_png(tmp_path / f"{i}.png", (20 * i, 90, 200 - 10 * i), size=40, seed=i)
        paths.append(str(tmp_path / f"{i}.png"))
    paths[5] = str(tmp_path / "missing.png")
    emb, errors = embed_images(
        encoder, paths, paths, tmp_path / "shards", ImageRun(batch_size=3, workers=0, shard_size=6)
    )
    assert [bool(e) for e in errors] == [i == 5 for i in range(11)]
    assert sorted(p.name for p in (tmp_path / "shards").glob("shard-*.npz")) == ["shard-00000.npz", "shard-00001.npz"]
    for i, p in enumerate(paths):
        if i != 5:
            assert np.allclose(emb[i], direct(encoder, p), atol=1e-5)
    assert not emb[5].any()
