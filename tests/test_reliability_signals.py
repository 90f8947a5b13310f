"""Ctrl-C (SIGINT) and ``kill`` (SIGTERM) at several points of every writing command
(docs/reliability.md, "Signals").

The signals are real: ``CIR_MINE_CRASH=NAME:N:INT|TERM`` (the crash point of ``atomic_path``, see
cir_mine.data.crash) makes the process send one to itself at the N-th write of NAME, after its temp file
is complete and before the rename, the worst moment for a writer. Commands run in this process (fast);
two run as subprocesses signalled from outside while they compute. Every case checks the exact
``Error:`` line, the exit code (128 + signal), that every input is byte-identical and that nothing is
left behind: no lock, no temp file, no folder made for the output, the replaced files as they were.
"""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cir_mine.data import crash
from cir_mine.cli import mine_app, train_app
from cir_mine.data.workspace import Workspace
from tests.fixtures import make_fashioniq, snapshot, tiny_synth, tree, write_tiny_clip_config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
NEGS = ["--strategy", "midzone", "-k", "4", "-q", "--device", "cpu"]
TRAIN = ["--epochs", "2", "--batch-size", "32", "--width", "0.5", "--threads", "1", "-q"]
EXIT = {"INT": 128 + signal.SIGINT, "TERM": 128 + signal.SIGTERM}
NAME = {"INT": "SIGINT", "TERM": "SIGTERM"}


def run(args, app=mine_app):
    return runner.invoke(app, [str(a) for a in args])


class Escaped(Exception):
    """A SIGTERM that reached the test outside a write job (where the command would have died)."""


@pytest.fixture(autouse=True)
def _hook(monkeypatch):
    """A fresh crash-point counter; a SIGTERM outside a write job fails the test instead of pytest."""
    crash.reset()

    def escaped(signum, frame):
        raise Escaped("SIGTERM outside a write job")

    old = signal.signal(signal.SIGTERM, escaped)
    yield
    signal.signal(signal.SIGTERM, old)
    crash.reset()


@pytest.fixture(autouse=True)
def _ctrl_c(request):
    """A SIGINT case needs Ctrl-C to reach the process. Started in the background without job
    control, a process ignores it, and the commands it starts keep ignoring it, as a background
    job should: there the case is skipped."""
    callspec = getattr(request.node, "callspec", None)
    sig = callspec.params.get("sig") if callspec else None
    if sig in ("INT", signal.SIGINT) and signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("Ctrl-C is ignored in this process (started in the background without job control)")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """W (train, d=16, flat index), NEGS mined on it, RUN trained on it, features F.npy + ids.txt of W's
    gallery, a FashionIQ folder with images, a tiny open_clip config and E embedded from them."""
    root = tmp_path_factory.mktemp("signals")
    for args, app in (
        (
            tiny_synth(root / "W", "--seed", "3"),
            mine_app,
        ),
        (["index", "--work", root / "W", "-q"], mine_app),
        (["negatives", "--work", root / "W", "--out", root / "negs.parquet", *NEGS], mine_app),
        (["--work", root / "W", "--out", root / "RUN", *TRAIN], train_app),
    ):
        r = run(args, app)
        assert r.exit_code == 0, r.output
    g = Workspace(root / "W").gallery("train")
    np.save(root / "F.npy", g.embeddings)
    (root / "ids.txt").write_text("".join(f"{i}\t{c}\n" for i, c in zip(g.image_ids, g.categories)))
    make_fashioniq(root / "fiq")
    write_tiny_clip_config(root / "cfg")
    r = run(EMBED(root))
    assert r.exit_code == 0, r.output
    return root


def EMBED(t: Path) -> list:
    return [
        "embed",
        "--dataset",
        "fashioniq",
        "--root",
        t / "fiq",
        "--work",
        t / "E",
        "--model",
        t / "cfg" / "cir-tiny-clip.json",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--shard-size",
        "6",
        "--overwrite",
        "-q",
    ]


@pytest.fixture
def t(base, tmp_path):
    """A private copy of the inputs."""
    for p in base.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp_path / p.name)
    return tmp_path


# command -> (arguments, app, points: the file names (NAME or NAME:N) whose write is interrupted)
COMMANDS = {
    "synth": (
        lambda t: tiny_synth(t / "W", "--seed", "9", "--overwrite"),
        mine_app,
        ["gallery.train.parquet", "triplets.train.parquet", "manifest.json"],
    ),
    "embed": (EMBED, mine_app, ["shard-00000.npz"]),  # later points: see the test of resumed embedding
    "index": (
        lambda t: ["index", "--work", t / "W", "--index", "IVF4,Flat", "-q"],
        mine_app,
        ["index.train.faiss", "index.train.faiss.json"],
    ),
    "index --from-features": (
        lambda t: [
            "index",
            "--work",
            t / "W",
            "--from-features",
            t / "F.npy",
            "--ids",
            t / "ids.txt",
            "--encoder-name",
            "synthetic",
            "--overwrite",
            "-q",
        ],
        mine_app,
        ["gallery.train.parquet", "index.train.faiss", "manifest.json"],
    ),
    "negatives": (
        lambda t: ["negatives", "--work", t / "W", "--out", t / "o" / "n.parquet", *NEGS],
        mine_app,
        ["n.parquet"],
    ),
    "positives": (
        lambda t: ["positives", "--work", t / "W", "--out", t / "o" / "p.parquet", "--dup-threshold", "1.01", "-q"],
        mine_app,
        ["p.parquet"],
    ),
    "export": (
        lambda t: [
            "export",
            t / "negs.parquet",
            "--format",
            "ntuple",
            "--work",
            t / "W",
            "--out",
            t / "o" / "x.parquet",
        ],
        mine_app,
        ["x.parquet"],
    ),
    "report": (
        lambda t: ["report", t / "negs.parquet", "--work", t / "W", "--out", t / "o" / "r.html", "--sheets", "0", "-q"],
        mine_app,
        ["r.html"],
    ),
    "inspect": (
        lambda t: ["inspect", t / "negs.parquet", "--work", t / "W", "--out", t / "o" / "s.png", "--sample", "1", "-q"],
        mine_app,
        ["s.png"],
    ),
    "cir-train": (
        lambda t: [
            "--work",
            t / "W",
            "--negatives",
            t / "negs.parquet",
            "--out",
            t / "RUN",
            "--overwrite",
            "--refresh-every",
            "1",
            *TRAIN,
        ],
        train_app,
        ["config.json", "negs.round1.parquet", "ckpt.pt:1"],
    ),
}
CASES = [(c, p, s) for c, (_, _, points) in COMMANDS.items() for p in points for s in ("INT", "TERM")]


@pytest.mark.parametrize("cmd,point,sig", CASES, ids=[f"{c}-{p}-{s}" for c, p, s in CASES])
def test_a_signal_at_any_write_leaves_everything_as_it_was(t, monkeypatch, cmd, point, sig):
    args, app, _ = COMMANDS[cmd]
    before, layout = snapshot(t), tree(t)
    monkeypatch.setenv(crash.CRASH_ENV, f"{point}:{sig}")
    r = run(args(t), app)
    assert r.exit_code == EXIT[sig], r.output
    assert r.output.strip() == f"Error: interrupted ({NAME[sig]}); nothing was changed.", r.output
    assert tree(t) == layout and snapshot(t) == before


EMBED_POINTS = [
    ("shard-00001.npz", 1),
    ("gallery.train.parquet", 3),
    ("triplets.train.parquet", 3),
    ("index.train.faiss", 3),
    ("manifest.json", 3),
]


@pytest.mark.parametrize("point,done", EMBED_POINTS)
@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_interrupted_embed_keeps_its_shards_and_the_rerun_resumes(t, monkeypatch, caplog, point, done, sig):
    """After a finished shard: the workspace as it was, the shards kept, and the same command resumes."""
    before = snapshot(t / "E")
    monkeypatch.setenv(crash.CRASH_ENV, f"{point}:{sig}")
    r = run(EMBED(t))
    assert r.exit_code == EXIT[sig], r.output
    assert r.output.strip() == (
        f"Error: interrupted ({NAME[sig]}); the workspace is as it was; {done} finished "
        f"shard(s) are kept in {t / 'E' / '.embed-train'}: rerun the same command to resume."
    ), r.output
    assert {k: v for k, v in snapshot(t / "E").items() if "/.embed-train/" not in k} == before
    assert sorted(os.listdir(t / "E" / ".embed-train")) == ["plan.json", *(f"shard-{i:05d}.npz" for i in range(done))]
    monkeypatch.delenv(crash.CRASH_ENV)
    with caplog.at_level(logging.INFO):
        r = run(EMBED(t))
    assert r.exit_code == 0, r.output
    assert f"resuming: {done} of 3 shards already done" in caplog.text or done == 3
    assert sorted(os.listdir(t / "E")) == sorted(Path(p).name for p in before)
    assert Workspace(t / "E").summary()["splits"]["train"]["images"] == 18


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_interrupted_training_after_a_checkpoint_is_resumed(t, monkeypatch, sig):
    """Once the new run has a checkpoint it stays (the old run it replaced is gone) and --resume finishes it."""
    monkeypatch.setenv(crash.CRASH_ENV, f"metrics.json:{sig}")
    r = run(COMMANDS["cir-train"][0](t), train_app)
    assert r.exit_code == EXIT[sig], r.output
    run_dir = t / "RUN"
    assert r.output.strip() == (
        f"Error: interrupted ({NAME[sig]}); {run_dir} keeps its last checkpoint: continue the "
        f"run with `cir-train --resume {run_dir}`."
    ), r.output
    assert sorted(os.listdir(run_dir)) == ["ckpt.pt", "config.json", "metrics.jsonl", "negs.round1.parquet"]
    monkeypatch.delenv(crash.CRASH_ENV)
    r = run(["--resume", run_dir, "-q"], train_app)
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(run_dir)) == [
        "ckpt.pt",
        "config.json",
        "curves.png",
        "metrics.json",
        "metrics.jsonl",
        "negs.round1.parquet",
    ]


def _signal_while(args: list, ready, sig: int, env=None) -> subprocess.CompletedProcess:
    """Run cir-mine/cir-train ``args`` in a process and send it ``sig`` once ``ready()`` holds."""
    app = "train_main" if args[0] == "cir-train" else "mine_main"
    p = subprocess.Popen(
        [sys.executable, "-c", f"from cli import {app}; {app}()", *map(str, args[1:])],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ready() and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, p.communicate()
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(args, p.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_from_outside_while_mining_leaves_nothing(t, sig):
    """`kill` and Ctrl-C while `negatives` mines (its lock held, nothing written yet). The workspace
    is large enough (3,000 queries searched one at a time) for the signal to find it mining."""
    work = t / "W-large"
    synth = ["synth", "--out", work, "--n-gallery", "20000", "--n-triplets", "3000", "--dim", "64", "-q"]
    assert run(synth).exit_code == 0
    out = t / "negs" / "n.parquet"
    before = snapshot(t)
    r = _signal_while(
        [
            "cir-mine",
            "negatives",
            "--work",
            work,
            "--out",
            out,
            "--strategy",
            "hardest",
            "--candidates",
            "300",
            "--query-batch",
            "1",
            "-k",
            "8",
            "-q",
        ],
        lambda: (out.parent / ".cir-mine.lock").exists(),
        sig,
    )
    assert r.returncode == 128 + sig, r.stderr
    assert r.stderr.strip() == f"Error: interrupted ({signal.Signals(sig).name}); nothing was changed.", r.stderr
    assert not out.parent.exists() and snapshot(t) == before


@pytest.mark.slow
def test_sigterm_from_outside_while_training_keeps_the_checkpoint(t):
    """`kill` during epoch 2 of a new run: the run keeps epoch 1's checkpoint, and --resume completes it."""
    run_dir = t / "run2"
    r = _signal_while(
        ["cir-train", "--work", t / "W", "--out", run_dir, *TRAIN, "--epochs", "400"],
        lambda: (run_dir / "ckpt.pt").exists(),
        signal.SIGTERM,
    )
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert r.stderr.strip().endswith(
        f"Error: interrupted (SIGTERM); {run_dir} keeps its last checkpoint: continue "
        f"the run with `cir-train --resume {run_dir}`."
    ), r.stderr
    assert not [p for p in os.listdir(run_dir) if p.endswith(".tmp") or p == ".cir-mine.lock"]


@pytest.mark.parametrize("to", ["the main thread", "another thread"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_held_back_while_the_lock_is_taken_leaves_no_lock(tmp_path, monkeypatch, sig, to):
    """A signal that arrives while the output folder's lock is being taken is held back until the
    lock is held, then delivered: the job stops with the lock released and the folder it made gone.
    Also when another thread of the process (a BLAS or Arrow pool) is the one the kernel hands it to."""
    import threading

    from cir_mine.data.errors import Interrupted
    from cir_mine.data.io import write_job
    from cir_mine.data.lock import DirLock

    idle = threading.Event()
    other = threading.Thread(target=idle.wait, daemon=True)
    other.start()
    real = DirLock.acquire

    def acquire(self):
        held = real(self)
        if to == "the main thread":
            signal.raise_signal(sig)  # pending: write_job takes the lock with signals held back
        else:
            signal.pthread_kill(other.ident, sig)  # Python runs the handler in the main thread soon after
            time.sleep(0.05)
        return held

    monkeypatch.setattr(DirLock, "acquire", acquire)
    try:
        with pytest.raises(Interrupted, match="nothing was changed"):
            with write_job(tmp_path / "new" / "out", "testing"):
                pytest.fail("the job body ran after the signal")
    finally:
        idle.set()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_the_temp_file_is_made_leaves_no_temp(tmp_path, monkeypatch, sig):
    """A signal that lands after the temp file exists but before atomic_path holds its name (inside
    mkstemp, or on the next line) is held back until the name is held, so the rollback removes it."""
    from cir_mine.data import atomic
    from cir_mine.data.signals import handle_signals

    real = atomic.tempfile.mkstemp

    def mkstemp_then_signal(*a, **kw):
        made = real(*a, **kw)
        signal.raise_signal(sig)  # the file exists; its name is not returned yet
        return made

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp_then_signal)
    with handle_signals(), pytest.raises(KeyboardInterrupt):
        with atomic.atomic_path(tmp_path / "out" / "metrics.jsonl") as tmp:
            tmp.write_text("never complete\n")
    assert not (tmp_path / "out").exists()
