"""cir-mine embed --engine ray on a local Ray cluster: the gallery parts equal single-process
embedding (same rows, embeddings within float tolerance), for image files and webdataset shards,
and a run stopped after some parts resumes with only the rest."""

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cir_mine.cli import mine_app
from cir_mine.data import crash
from cir_mine.data.workspace import Workspace
from cir_mine.miner.encode.clip import EncoderConfig, ImageRun
from cir_mine.miner.encode.config import EmbedJob
from cir_mine.miner.encode.local import embed_dataset
from tests.fixtures import make_fashioniq, write_tiny_clip_config

ray = pytest.importorskip("ray")
runner = CliRunner()
pytestmark = pytest.mark.slow  # each test starts open_clip actors (about 10 s of imports each)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_tiny_clip_config(tmp_path_factory.mktemp("clip")))


def make_shards(root: Path, fiq: Path, per_shard: int = 7) -> tuple[str, Path]:
    """img2dataset-style tars of the FashionIQ fixture's images (KEY.png + KEY.json with the category)
    and a triplets CSV naming keys; returns (the brace pattern, the CSV)."""
    imgs = sorted((fiq / "images").glob("*.png"))
    cats = {"B0": "dress", "B1": "shirt", "B2": "toptee"}
    root.mkdir(parents=True)
    n = (len(imgs) + per_shard - 1) // per_shard
    for s in range(n):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for p in imgs[s * per_shard : (s + 1) * per_shard]:
                tf.add(p, arcname=p.name)
                b = ('{"category": "%s", "url": "http://x/%s"}' % (cats[p.stem[:2]], p.name)).encode()
                ti = tarfile.TarInfo(p.stem + ".json")
                ti.size = len(b)
                tf.addfile(ti, io.BytesIO(b))
    csv = root / "triplets.csv"
    csv.write_text(
        "ref,target,caption\n" + "".join(f"{a.stem},{b.stem},is darker\n" for a, b in zip(imgs[:-1:2], imgs[1::2]))
    )
    return str(root / f"{{00000..{n - 1:05d}}}.tar"), csv


def _same_workspace(a: Workspace, b: Workspace, split="train"):
    ga, gb = a.gallery(split), b.gallery(split)
    assert ga.image_ids.tolist() == gb.image_ids.tolist() and ga.categories.tolist() == gb.categories.tolist()
    assert ga.attributes == gb.attributes and ga.paths.tolist() == gb.paths.tolist()
    np.testing.assert_allclose(ga.embeddings, gb.embeddings, atol=1e-5)
    ta, tb = a.triplets(split), b.triplets(split)
    assert ta.query_ids.tolist() == tb.query_ids.tolist() and ta.target_ids.tolist() == tb.target_ids.tolist()
    np.testing.assert_allclose(ta.text_embeddings, tb.text_embeddings, atol=1e-6)


def _job(dataset, root, work, model, triplets=None):
    return EmbedJob(
        dataset,
        Path(root),
        "train",
        work,
        EncoderConfig(model, "none", "cpu"),
        ImageRun(4, 0, 4096),
        triplets_file=triplets,
    )


def test_ray_embed_webdataset_equals_single_process(cluster, model, tmp_path):
    fiq = make_fashioniq(tmp_path / "fiq")
    pattern, csv = make_shards(tmp_path / "shards", fiq)
    base = [
        "embed",
        "--dataset",
        "webdataset",
        "--root",
        pattern,
        "--triplets",
        str(csv),
        "--model",
        model,
        "--device",
        "cpu",
        "-b",
        "4",
        "--workers",
        "0",
        "-q",
    ]
    r = runner.invoke(mine_app, base + ["--work", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        mine_app,
        base + ["--work", str(tmp_path / "ray"), "--engine", "ray", "--part-size", "6", "--cpus-per-actor", "0.5"],
    )
    assert r.exit_code == 0, r.output
    one, sharded = Workspace(tmp_path / "one"), Workspace(tmp_path / "ray")
    _same_workspace(one, sharded)
    g = sharded.gallery("train")
    assert len(g) == 18 and set(g.categories.tolist()) == {"dress", "shirt", "toptee"}
    assert g.paths[0] == f"{tmp_path / 'shards' / '00000.tar'}::{g.image_ids[0]}.png"


def test_ray_embed_resumed_per_part_equals_single_process(cluster, model, tmp_path, caplog, monkeypatch):
    """Stopped after 2 of 5 parts, rerun with a pool of 2 actors: only the 3 missing parts are embedded,
    and the gallery folder equals the single-process gallery file."""
    from cir_mine.miner.distributed.ray_embed import RayEmbedRun, embed_dataset_ray

    fiq = make_fashioniq(tmp_path / "fiq")
    job = _job("fashioniq", fiq, tmp_path / "ray", model)
    crash.reset()
    monkeypatch.setenv(crash.CRASH_ENV, "embed-saved:2:RAISE")
    with pytest.raises(RuntimeError, match="crash point embed-saved reached"):
        embed_dataset_ray(job, RayEmbedRun(actors=1, part_size=4, batch_size=4, cpus_per_actor=0.5))
    monkeypatch.delenv(crash.CRASH_ENV)
    scratch = tmp_path / "ray" / ".embed-train"
    assert sorted(p.name for p in scratch.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    with caplog.at_level(logging.INFO, logger="cir_mine"):
        m = embed_dataset_ray(job, RayEmbedRun(actors=2, part_size=4, batch_size=3, cpus_per_actor=0.5))
    assert "resuming: 2 of 5 parts already done" in caplog.text
    ws = Workspace(tmp_path / "ray")
    assert [p.name for p in ws.gallery_files("train")] == [f"part-{i:05d}.parquet" for i in range(5)]  # 18 images / 4
    assert m["embed"]["train"]["engine"]["parts"] == 5 and not scratch.exists()
    embed_dataset(_job("fashioniq", fiq, tmp_path / "one", model))
    _same_workspace(Workspace(tmp_path / "one"), ws)
