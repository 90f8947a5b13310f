"""Crash points: where a test makes a process fail on purpose, named by one environment variable.

``CIR_MINE_CRASH=POINT[:N][:ACTION][@FILE]`` makes the N-th (default: first) arrival of this process
at the crash point POINT do ACTION:

- ``KILL`` (the default): SIGKILL, a crash nothing can clean up after;
- ``INT``: SIGINT, as Ctrl-C sends; ``TERM``: SIGTERM, as ``kill`` sends;
- ``RAISE``: a RuntimeError ("crash point POINT reached");
- ``EXIT``: ``os._exit(1)``, a worker process that dies (e.g. a Ray actor, which Ray restarts).

With ``@FILE`` the point fires only while FILE does not exist, and creates it first (holding the
pid): once across processes, so a restarted worker does not crash again.

The crash points, each checked by :func:`crash_point`:

- ``NAME``: an atomic write of a file called NAME (e.g. ``ckpt.pt``), after its temp file is
  complete and before the rename, the worst moment for a writer (:mod:`cir_mine.data.atomic`);
- ``epoch-saved``: after a training epoch's checkpoint is saved (:mod:`cir_mine.train.loop`);
- ``embed-saved``: after an embedding executor writes a finished unit to the resume folder: a shard
  (:mod:`cir_mine.miner.encode.local`) or a part, in the Ray driver (:mod:`cir_mine.miner.distributed.ray_embed`);
- ``shard-search-S``: a search of the shard searcher of shard S (:mod:`cir_mine.miner.distributed.shards`).

Ray actors get the variable from the driver (:func:`crash_env`).
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "CIR_MINE_CRASH"
_ACTIONS = ("KILL", "INT", "TERM", "RAISE", "EXIT")
_SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}
_ARRIVALS: dict = {}  # (spec, point) -> arrivals of this process so far


def parse(spec: str) -> tuple[str, int, str, str]:
    """``POINT[:N][:ACTION][@FILE]`` -> (point, n, action, file or '')."""
    spec, _, once = spec.partition("@")
    point, *rest = spec.split(":")
    n = next((int(x) for x in rest if x.isdigit()), 1)
    action = next((x for x in rest if not x.isdigit()), "KILL")
    if action not in _ACTIONS:
        raise ValueError(f"{CRASH_ENV}={spec}: unknown action {action!r}; use one of {', '.join(_ACTIONS)}")
    return point, n, action, once


def crash_point(point: str) -> None:
    """Arrive at the crash point ``point``: nothing happens unless ``CIR_MINE_CRASH`` names it."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, n, action, once = parse(spec)
    if name != point:
        return
    _ARRIVALS[spec, point] = _ARRIVALS.get((spec, point), 0) + 1
    if _ARRIVALS[spec, point] != n:
        return
    if once:
        try:
            fd = os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    if action == "RAISE":
        raise RuntimeError(f"crash point {point} reached ({CRASH_ENV}={spec})")
    if action == "EXIT":
        os._exit(1)
    os.kill(os.getpid(), _SIGNALS[action])


def crash_env() -> dict:
    """``{CIR_MINE_CRASH: spec}`` when set, else {}: what a worker process (a Ray actor) inherits."""
    spec = os.environ.get(CRASH_ENV)
    return {CRASH_ENV: spec} if spec else {}


def reset() -> None:
    """Forget the arrivals counted so far (tests that arm the same point twice in one process)."""
    _ARRIVALS.clear()
