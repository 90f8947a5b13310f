"""DirLock: atomic acquisition, one holder at a time, stale takeover, malformed lock files."""

import json
import multiprocessing as mp
import os
import socket

import pytest

from cir_mine.data.errors import DataError, LockedError
from cir_mine.data.io import DirLock

TRIALS = 40
PROCS = 4


def _racer(d: str, barrier, trials: int, results) -> None:
    try:
        _race(d, barrier, trials, results)
    except Exception as e:  # a broken barrier or a vanished marker: report, never hang
        barrier.abort()
        results.put(("error", repr(e)))


def _race(d: str, barrier, trials: int, results) -> None:
    held = 0
    for t in range(trials):
        barrier.wait(10)
        lock = DirLock(os.path.join(d, str(t)), "racer")
        try:
            lock.acquire()
        except LockedError:
            pass
        else:
            held += 1
            marker = os.path.join(d, str(t), "holder")
            try:  # a second simultaneous holder would find the marker
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
            except FileExistsError:
                results.put(("overlap", t))
                barrier.abort()
                return
            barrier.wait(10)  # every racer has tried while this one holds the lock
            os.unlink(marker)
            lock.release()
            continue
        barrier.wait(10)
    results.put(("held", held))


def test_racing_processes_never_hold_one_lock_together(tmp_path):
    """4 processes race for a fresh lock in each of 40 trials: exactly one holder per trial."""
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(PROCS), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), barrier, TRIALS, results)) for _ in range(PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = [results.get(timeout=5) for _ in range(PROCS)]
    assert not [g for g in got if g[0] != "held"]
    assert sum(g[1] for g in got if g[0] == "held") == TRIALS  # one holder in every trial


def test_racing_processes_over_one_reused_lock(tmp_path):
    """The same directory, taken and released again and again: never two holders at once."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()

    def worker(n):
        overlaps = 0
        for _ in range(n):
            try:
                with DirLock(tmp_path, "racer"):
                    try:
                        os.close(os.open(tmp_path / "holder", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    except FileExistsError:
                        overlaps += 1
                        continue
                    os.unlink(tmp_path / "holder")
            except LockedError:
                pass
        results.put(overlaps)

    procs = [ctx.Process(target=worker, args=(300,)) for _ in range(PROCS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [results.get(timeout=5) for _ in procs] == [0] * PROCS


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    ctx = mp.get_context("fork")
    p = ctx.Process(target=lambda: DirLock(tmp_path, "killed").acquire() and os._exit(0))
    p.start()
    p.join()
    assert json.loads((tmp_path / DirLock.NAME).read_text())["purpose"] == "killed"  # left behind
    with DirLock(tmp_path, "rerun"):
        assert json.loads((tmp_path / DirLock.NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / DirLock.NAME).exists()


def test_a_live_holder_is_never_broken(tmp_path):
    # a lock file naming a live process on this host (pid 1) is respected even without an OS lock
    (tmp_path / DirLock.NAME).write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "purpose": "job"}))
    with pytest.raises(LockedError, match=r"is in use by process 1 \(job\)"):
        DirLock(tmp_path).acquire()
    assert (tmp_path / DirLock.NAME).exists()
    with DirLock(tmp_path / "x", "holder"):
        with pytest.raises(LockedError, match=f"in use by process {os.getpid()} \\(holder\\)"):
            DirLock(tmp_path / "x").acquire()


@pytest.mark.parametrize(
    "content, shown",
    [
        ("[1, 2]", "'[1, 2]'"),
        ('{"pid": "abc"}', '\'{"pid": "abc"}\''),
        ('{"pid": -4}', "'{\"pid\": -4}'"),
        ("garbage", "'garbage'"),
    ],
)
def test_malformed_lock_file(tmp_path, content, shown):
    (tmp_path / DirLock.NAME).write_text(content)
    with pytest.raises(DataError) as e:
        DirLock(tmp_path).acquire()
    assert str(e.value) == (
        f"{tmp_path / DirLock.NAME}: not a cir-mine lock file (expected a JSON object with an "
        f"integer pid, found {shown}). Delete it if no cir-mine job is running."
    )
    assert (tmp_path / DirLock.NAME).read_text() == content


def test_lock_that_is_a_folder(tmp_path):
    (tmp_path / DirLock.NAME).mkdir()
    with pytest.raises(DataError) as e:
        DirLock(tmp_path).acquire()
    assert str(e.value) == (
        f"{tmp_path / DirLock.NAME}: is a folder, not a cir-mine lock file. Remove it if no cir-mine job is running."
    )
