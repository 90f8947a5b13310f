"""Real full disks (docs/reliability.md, "Full disks and failing writers").

Each case mounts a small tmpfs (CI runs as root; elsewhere these tests skip, naming why) and fills it,
either before the command or at a chosen write (the crash-point hook of ``atomic_path``, replaced by a
function that fills the disk there), so the next write gets a real ENOSPC from the kernel, from
Python, Arrow, FAISS or torch. Every case checks the exact ``Error:`` line, the exit code, that the
inputs are byte-identical and that nothing is left behind. Where no tmpfs can be mounted, a file-size
limit (RLIMIT_FSIZE: EFBIG, "File too large") checks the same paths for FAISS and torch.
"""

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cir_mine.data.atomic as atomic
from cir_mine.cli import mine_app, train_app
from cir_mine.data.workspace import Workspace, gallery_table, write_gallery_parts
from tests.fixtures import make_fashioniq, snapshot, tiny_synth, tree

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
NEGS = ["--strategy", "midzone", "-k", "4", "-q", "--device", "cpu"]
TRAIN = ["--epochs", "2", "--batch-size", "32", "--width", "0.5", "--threads", "1", "-q"]
FULL = "No space left on device"


def run(args, app=mine_app):
    return runner.invoke(app, [str(a) for a in args])


def cannot_write(path) -> str:
    return f"Error: {path}: cannot write ({FULL}). Free some space, or choose a writable location."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    for args, app in (
        (
            tiny_synth(root / "W", "--seed", "3"),
            mine_app,
        ),
        (["negatives", "--work", root / "W", "--out", root / "negs.parquet", *NEGS], mine_app),
        (["--work", root / "W", "--out", root / "RUN", *TRAIN], train_app),
    ):
        r = run(args, app)
        assert r.exit_code == 0, r.output
    g = Workspace(root / "W").gallery("train")
    np.save(root / "F.npy", g.embeddings)
    (root / "ids.txt").write_text("".join(f"{i}\t{c}\n" for i, c in zip(g.image_ids, g.categories)))
    return root


@pytest.fixture
def disk(tmp_path):
    """-> mount(size) -> an empty folder on a fresh tmpfs of ``size``; unmounted afterwards."""
    mounts = []

    def mount(size: str = "4m") -> Path:
        d = tmp_path / f"fs{len(mounts)}"
        d.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True
        )
        if r.returncode:
            pytest.skip(
                f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}): the real full-disk cases "
                f"need root (CI runs as root); test_file_size_limit_* cover FAISS and torch without it"
            )
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(fs: Path, leave: int = 0) -> None:
    """Fill the file system of ``fs`` (a file ``fs/.filler``), then free ``leave`` bytes again."""
    with open(fs / ".filler", "ab", buffering=0) as fh:  # unbuffered: closing it flushes nothing
        for chunk in (1 << 16, 1 << 12, 1):  # down to the last byte, whatever the free space's alignment
            try:
                while fh.write(b"\0" * chunk):
                    pass
            except OSError:
                pass
    if leave:
        with open(fs / ".filler", "r+b") as fh:
            fh.truncate(max(0, os.fstat(fh.fileno()).st_size - leave))


@pytest.fixture
def fill_at(monkeypatch):
    """-> fill_at(fs, NAME[:N]): the disk of ``fs`` becomes full at the N-th write of a file called NAME,
    after its temp file is complete (at the crash point atomic_path passes there, see cir_mine.data.crash)."""

    def arm(fs: Path, spec: str):
        name, _, nth = spec.partition(":")
        seen = {"n": 0}
        real = atomic.crash_point

        def hook(point):
            real(point)
            if point == name:
                seen["n"] += 1
                if seen["n"] == int(nth or 1):
                    fill(fs)

        monkeypatch.setattr(atomic, "crash_point", hook)

    return arm


def copy(base: Path, dest: Path, *names) -> None:
    for n in names:
        (shutil.copytree if (base / n).is_dir() else shutil.copy2)(base / n, dest / n)


def leaves_nothing(fs: Path, before: dict, layout: list) -> None:
    (fs / ".filler").unlink(missing_ok=True)
    assert tree(fs) == layout and snapshot(fs) == before


# ------------------------------------------------------------------------------------------ cases


def test_synth_onto_a_full_disk_keeps_the_workspace(base, disk, fill_at):
    fs = disk()
    copy(base, fs, "W")
    before, layout = snapshot(fs), tree(fs)
    fill_at(fs, "gallery.train.parquet")
    r = run(tiny_synth(fs / "W", "--seed", "9", "--overwrite"))
    assert r.exit_code == 1 and r.output.strip() == cannot_write(fs / "W" / "triplets.train.parquet"), r.output
    leaves_nothing(fs, before, layout)


def test_faiss_writing_the_index_onto_a_full_disk(base, disk):
    """FAISS reports the full disk as a RuntimeError: it becomes the one-line error, the old index stays."""
    fs = disk()
    copy(base, fs, "W")
    assert run(["index", "--work", fs / "W", "-q"]).exit_code == 0
    before, layout = snapshot(fs), tree(fs)
    fill(fs, leave=8192)  # room for the lock, not for the index
    r = run(["index", "--work", fs / "W", "--index", "IVF4,Flat", "-q"])
    assert r.exit_code == 1 and r.output.strip() == cannot_write(fs / "W" / "index.train.faiss"), r.output
    leaves_nothing(fs, before, layout)


def test_an_import_over_a_parts_folder_onto_a_full_disk_keeps_the_parts(base, disk, fill_at):
    fs = disk("8m")
    copy(base, fs, "W")
    ws = Workspace(fs / "W")
    g = ws.gallery("train")
    rows = np.array_split(np.arange(len(g)), 2)
    write_gallery_parts(
        [
            gallery_table(
                g.image_ids[r].tolist(), g.categories[r].tolist(), [list(g.attributes[i]) for i in r], g.embeddings[r]
            )
            for r in rows
        ],
        ws.gallery_dir("train"),
    )
    (fs / "W" / "gallery.train.parquet").unlink()
    before, layout = snapshot(fs), tree(fs)
    fill_at(fs, "gallery.train.parquet")
    r = run(
        [
            "index",
            "--work",
            fs / "W",
            "--from-features",
            base / "F.npy",
            "--ids",
            base / "ids.txt",
            "--encoder-name",
            "synthetic",
            "--overwrite",
            "-q",
        ]
    )
    assert r.exit_code == 1 and r.output.strip() == cannot_write(fs / "W" / "index.train.faiss"), r.output
    leaves_nothing(fs, before, layout)


def test_torch_saving_the_checkpoint_onto_a_full_disk_keeps_the_old_run(base, disk, fill_at):
    """cir-train --overwrite: the full disk during torch.save is the one-line error; the old run is intact."""
    fs = disk("8m")
    copy(base, fs, "RUN")
    before, layout = snapshot(fs), tree(fs)
    fill_at(fs, "metrics.jsonl")  # the next write is the first checkpoint
    r = run(["--work", base / "W", "--out", fs / "RUN", "--overwrite", *TRAIN], train_app)
    assert r.exit_code == 1 and r.output.strip() == cannot_write(fs / "RUN" / "ckpt.pt"), r.output
    leaves_nothing(fs, before, layout)


def test_negatives_onto_a_full_disk_leaves_nothing(base, disk):
    fs = disk()
    before, layout = snapshot(fs), tree(fs)
    fill(fs, leave=8192)
    r = run(["negatives", "--work", base / "W", "--out", fs / "o" / "n.parquet", *NEGS])
    assert r.exit_code == 1 and r.output.strip() == cannot_write(fs / "o" / "n.parquet"), r.output
    leaves_nothing(fs, before, layout)


def test_export_of_caption_files_onto_a_full_disk_writes_none(base, tmp_path, disk, fill_at):
    """All or nothing across the caption files (a full disk once left 1 of 3)."""
    from tests.test_api_cli import _dataset_negatives

    root = make_fashioniq(tmp_path / "fiq")
    negs = _dataset_negatives(root, "fashioniq", "train", tmp_path / "fiq-negs.parquet")
    fs = disk()
    before, layout = snapshot(fs), tree(fs)
    fill_at(fs, "cap.dress.train.json")
    r = run(["export", negs, "--format", "jsonl", "--root", root, "--out", fs / "captions"])
    assert r.exit_code == 1 and r.output.strip() == cannot_write(fs / "captions" / "cap.shirt.train.json"), r.output
    leaves_nothing(fs, before, layout)


# ------------------------------------------------------------------------------------------ without a tmpfs


def _limited(args: list, limit: int, app: str = "mine_main") -> subprocess.CompletedProcess:
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-c", f"from cli import {app}; {app}()", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_file_size_limit_on_faiss_and_torch_writers(base, tmp_path):
    """EFBIG instead of ENOSPC: the RuntimeErrors of FAISS and torch still become the one-line error."""
    shutil.copytree(base / "W", tmp_path / "W")
    shutil.copytree(base / "RUN", tmp_path / "RUN")
    before, layout = snapshot(tmp_path), tree(tmp_path)
    r = _limited(["index", "--work", tmp_path / "W", "-q"], 16_000)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"Error: {tmp_path / 'W' / 'index.train.faiss'}: cannot write "
        f"(File too large). Free some space, or choose a writable "
        f"location."
    ), r.stderr
    r = _limited(["--work", tmp_path / "W", "--out", tmp_path / "RUN", "--overwrite", *TRAIN], 20_000, "train_main")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"Error: {tmp_path / 'RUN' / 'ckpt.pt'}: cannot write "
        f"(File too large). Free some space, or choose a writable "
        f"location."
    ), r.stderr
    assert tree(tmp_path) == layout and snapshot(tmp_path) == before
