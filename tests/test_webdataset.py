"""The webdataset adapter (img2dataset tar shards) without Ray: brace patterns, samples by key,
errors, and single-process embedding reading images out of the tars."""

import io
import tarfile

import numpy as np
import pytest

from cir_mine.data.errors import DataError
from cir_mine.data.webdataset import expand_braces, load_webdataset, read_member, sample_key
from cir_mine.data.workspace import Workspace
from tests.fixtures import make_fashioniq, write_tiny_clip_config


def _tar(path, members: dict):
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_expand_braces_keeps_padding_and_order():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert sample_key("dir/000010003.jpg") == ("dir/000010003", ".jpg")
    assert sample_key("000010003.seg.png") == ("000010003", ".seg.png")


def test_samples_by_key_with_category_and_errors(tmp_path):
    _tar(
        tmp_path / "00000.tar",
        {
            "k1.jpg": b"x",
            "k1.json": b'{"category": "dress"}',
            "k1.txt": b"a cap",
            "k2.png": b"y",
            "k3.txt": b"no image",
        },
    )
    _tar(tmp_path / "00001.tar", {"k4.webp": b"z"})
    images, queries = load_webdataset(str(tmp_path / "{00000..00001}.tar"), "train")
    assert [(im.image_id, im.category) for im in images] == [("k1", "dress"), ("k2", ""), ("k4", "")]
    assert images[0].path == f"{tmp_path / '00000.tar'}::k1.jpg" and read_member(images[0].path) == b"x"
    assert queries == []
    with pytest.raises(DataError, match=r"00002\.tar: shard not found \(1 of 3 shards named by .* are missing\)"):
        load_webdataset(str(tmp_path / "{00000..00002}.tar"), "train")
    _tar(tmp_path / "00002.tar", {"k2.jpg": b"again"})
    with pytest.raises(
        DataError, match=r"00002\.tar: key 'k2' also appears in .*00000\.tar; sample keys must be unique"
    ):
        load_webdataset(str(tmp_path), "train")  # a directory: every *.tar in it
    csv = tmp_path / "t.csv"
    csv.write_text("ref,target,caption\nk1,k9,is red\n")
    with pytest.raises(DataError, match=r"row 0 'target' names key 'k9' that is in none of the shards"):
        load_webdataset(str(tmp_path / "{00000..00001}.tar"), "train", triplets=csv)


def test_single_process_embed_reads_images_from_tars(tmp_path):
    """The same images as files or as tar members embed to the same vectors."""
    from cir_mine.miner.encode.clip import EncoderConfig, ImageRun
    from cir_mine.miner.encode.config import EmbedJob
    from cir_mine.miner.encode.local import embed_dataset

    fiq = make_fashioniq(tmp_path / "fiq")
    imgs = sorted((fiq / "images").glob("*.png"))
    _tar(tmp_path / "00000.tar", {p.name: p.read_bytes() for p in imgs})
    model = str(write_tiny_clip_config(tmp_path / "clip"))
    csv = tmp_path / "t.csv"
    csv.write_text(
        "ref,target,caption\n" + "".join(f"{a.stem},{b.stem},is darker\n" for a, b in zip(imgs[:-1], imgs[1:]))
    )
    enc = EncoderConfig(model, "none", "cpu")
    embed_dataset(
        EmbedJob(
            "webdataset", tmp_path / "00000.tar", "train", tmp_path / "w", enc, ImageRun(4, 0, 4096), triplets_file=csv
        )
    )
    embed_dataset(EmbedJob("fashioniq", fiq, "train", tmp_path / "f", enc, ImageRun(4, 0, 4096)))
    g, f = Workspace(tmp_path / "w").gallery("train"), Workspace(tmp_path / "f").gallery("train")
    row = {k: i for i, k in enumerate(f.image_ids.tolist())}
    assert sorted(g.image_ids.tolist()) == sorted(row)
    np.testing.assert_allclose(g.embeddings, f.embeddings[[row[k] for k in g.image_ids.tolist()]], atol=1e-5)
    assert len(Workspace(tmp_path / "w").triplets("train")) == len(imgs) - 1


def test_contact_sheet_reads_images_out_of_the_tars(tmp_path):
    """inspect draws gallery images whose path is TAR::MEMBER."""
    from cir_mine.data.workspace import Gallery
    from cir_mine.miner.inspection.contact_sheet import _image_path
    from PIL import Image

    fiq = make_fashioniq(tmp_path / "fiq")
    png = sorted((fiq / "images").glob("*.png"))[0]
    _tar(tmp_path / "00000.tar", {png.name: png.read_bytes()})
    paths = np.array([f"{tmp_path / '00000.tar'}::{png.name}", f"{tmp_path / '00000.tar'}::nope.png"], dtype=object)
    g = Gallery(
        tmp_path,
        np.array(["a", "b"], dtype=object),
        np.array(["", ""], dtype=object),
        [[], []],
        np.zeros((2, 4), np.float32),
        paths,
    )
    with Image.open(_image_path(g, 0, None)) as im, Image.open(png) as ref:
        assert np.array_equal(np.asarray(im), np.asarray(ref))
    with pytest.raises(DataError, match=r"00000\.tar: no readable member nope\.png \(gallery path of 'b'\)"):
        _image_path(g, 1, None)
