"""Ray back-end: gallery shards held by Ray actors behind FAISS's ``search(xq, k) -> (D, I)``.

:class:`RayShardedIndex` trains the shard index once on the driver (:func:`train_shard_index`),
puts each shard's rows into the object store and starts one :class:`ShardSearcher` actor per shard.
A search sends the query batch to every actor and merges their re-ranked top-k lists exactly
(:func:`merge_topk`), so the mining core sees one index. Actors are restartable and their calls
retried (``max_restarts``, ``max_task_retries``): a searcher that dies mid-run is rebuilt from its
constructor arguments (still in the object store) and the lost search runs again; the result is
the same because a search is a pure function of the shard and the queries.

Ray is an optional dependency (the ``ray`` extra): it is imported only here, lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np

from cir_mine.data.crash import crash_env
from cir_mine.data.errors import UsageError
from cir_mine.miner.core.search.topk import merge_topk
from cir_mine.miner.distributed.shards import ShardConfig, ShardSearcher, shard_bounds, train_shard_index

log = logging.getLogger(__name__)

RAY_MISSING = "engine ray needs Ray, which is not installed: install the 'ray' extra (pip install 'cir-mine[ray]')."


CONNECT_TIMEOUT = 10.0  # seconds an address has to answer before joining it is given up
START_TIMEOUT = 300.0  # seconds the shard actors have to start (their rows copied in) on a cluster that can place them


@dataclass(frozen=True)
class RayConfig:
    # fmt: off
    address: Optional[str] = None          # the cluster to join: auto or HOST:PORT (None: start a local one)
    cpus_per_shard: Optional[float] = None  # CPUs each shard actor reserves, its FAISS threads max(1, floor) (None: 1,
                                            # or a fraction so that every shard fits the cluster)
    max_restarts: int = 3                  # restarts of a shard actor that dies
    max_task_retries: int = 3              # retries of a search lost with its actor
    connect_timeout: float = CONNECT_TIMEOUT  # seconds the address has to answer
    start_timeout: float = START_TIMEOUT    # seconds the shard actors have to start
    # fmt: on

    def recorded(self) -> dict:
        """What a table's footer keeps to search the same way again (not the address nor the timeouts)."""
        return {
            "cpus_per_shard": self.cpus_per_shard,
            "max_restarts": self.max_restarts,
            "max_task_retries": self.max_task_retries,
        }


def require_ray():
    """The ``ray`` module, or UsageError naming the extra. The level the ``ray`` logger had before the
    import (Ray's import resets it to INFO) is kept: that level is how quiet Ray is told to be."""
    level = logging.getLogger("ray").level
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING, params=("engine",)) from None
    if level:
        logging.getLogger("ray").setLevel(level)
    return ray


def connect(address: Optional[str] = None, timeout: float = CONNECT_TIMEOUT):
    """Join the cluster at ``address`` ('auto', HOST:PORT), or start a local one; reuse a live connection.

    An address that does not answer as a Ray cluster within ``timeout`` seconds is a UsageError (Ray
    itself would retry for minutes, printing its own log lines). Ray logs at the level of the ``ray``
    logger (the CLI's ``-q`` sets it to ERROR: Ray's warnings and its core's log lines are then off)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    level = max(logging.getLogger("ray").getEffectiveLevel(), logging.INFO)
    if level >= logging.ERROR:
        quiet_ray()
    if address:
        target = _bootstrap_address(address)
        if target:
            _probe(target, timeout, address)
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        with ray_stderr():
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=level)
            else:
                ray.init(include_dashboard=False, log_to_driver=False, logging_level=level)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(
            f"ray_address {address}: cannot join a Ray cluster ({str(e).splitlines()[0][:200]}). "
            f"Start one with `ray start --head`, pass its HOST:PORT, or omit ray_address "
            f"for a local cluster.",
            params=("ray_address",),
        ) from None
    finally:
        if sigterm is not None:  # ray.init exits on SIGTERM; a write job rolls back instead
            signal.signal(signal.SIGTERM, sigterm)
    log.info("Ray cluster: %s", ray.cluster_resources())
    return ray


def quiet_ray() -> None:
    """Ray's own output off: its core processes' log lines, Ray Data's progress bars, its Python warnings."""
    import warnings

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")


@contextlib.contextmanager
def ray_stderr():
    """With the ``ray`` logger at ERROR or above (``-q``), what is written to file descriptor 2 inside the
    block is dropped: the block holds only Ray calls (starting or joining the cluster, creating actors),
    whose core logs to that descriptor itself. Errors they raise are reported after the block."""
    if logging.getLogger("ray").getEffectiveLevel() < logging.ERROR:
        yield
        return
    import sys

    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _bootstrap_address(address: str) -> Optional[str]:
    """HOST:PORT that ``address`` names ('auto': the running cluster Ray would join), or None."""
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            return canonicalize_bootstrap_address("auto")
        except Exception:  # noqa: BLE001 - no running cluster: ray.init says so at once
            return None
    return address.split("://", 1)[-1]


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _probe(target: str, timeout: float, address: str) -> None:
    """A Ray cluster's GCS speaks gRPC: it answers HTTP/2's client preface with a SETTINGS frame. No answer
    within ``timeout`` seconds (refused, unroutable, silent, not gRPC) is a UsageError naming the address."""
    host, _, port = target.rpartition(":")
    reason = None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(_HTTP2_PREFACE)
            head = s.recv(9)
            if len(head) < 4 or head[3] != 0x4:
                reason = "it does not speak Ray's protocol"
    except socket.timeout:
        reason = f"no answer within {timeout:g} s"
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
    if reason:
        raise UsageError(
            f"ray_address {address}: no Ray cluster answers at {target} ({reason}). Start one with "
            f"`ray start --head` and pass the address it prints, or omit ray_address for a local "
            f"cluster.",
            params=("ray_address",),
        )


def shard_cpus(
    shards: int, asked: Optional[float], cluster: float, option: str = "cpus_per_shard", count: str = "shards"
) -> float:
    """CPUs each of ``shards`` actors reserves: ``asked``, or (None) 1 when every actor fits the
    ``cluster``'s CPUs and else the fraction that does (Ray places 1/10000 CPU steps). Asked for
    more than the cluster has in all: a UsageError naming ``option``, never a wait without end."""
    if asked is None:
        if cluster <= 0 or shards <= cluster:
            return 1.0
        return max(math.floor(cluster / shards * 10_000) / 10_000, 0.0001)
    if cluster > 0 and shards * asked > cluster + 1e-9:
        fit = math.floor(cluster / shards * 10_000) / 10_000
        raise UsageError(
            f"{option} {asked:g}: {count} {shards} x {option} {asked:g} = {shards * asked:g} CPUs, but the "
            f"Ray cluster has {cluster:g}, so the actors could never all start. Pass {option} {fit:g} "
            f"or less, or lower {count}.",
            params=(option, count),
        )
    return asked


class _Searcher(ShardSearcher):
    """ShardSearcher with its FAISS thread count set inside the actor process."""

    def __init__(self, *args, threads: int = 1, **kw):
        from cir_mine.miner.core.search.faiss_api import load_faiss

        load_faiss().omp_set_num_threads(max(1, int(threads)))
        super().__init__(*args, **kw)

    def ready(self) -> int:
        return self.ntotal


class RayShardedIndex:
    """S shard actors behind FAISS's interface: ``d``, ``ntotal``, ``search(xq, k)``, ``describe()``.

    xb: float32[n, d] unit rows (the gallery). The actors inherit this process's crash point
    (cir_mine.data.crash; e.g. ``shard-search-1:EXIT@FILE``: the actor of shard 1 dies on its first
    search, once), which a run must not notice."""

    def __init__(self, xb: np.ndarray, cfg: ShardConfig = ShardConfig(), ray_cfg: RayConfig = RayConfig()):
        if (
            (ray_cfg.cpus_per_shard is not None and ray_cfg.cpus_per_shard <= 0)
            or ray_cfg.max_restarts < 0
            or ray_cfg.max_task_retries < 0
        ):
            raise UsageError(
                f"cpus_per_shard must be above 0 (got {ray_cfg.cpus_per_shard}).", params=("cpus_per_shard",)
            )
        ray = connect(ray_cfg.address, ray_cfg.connect_timeout)
        self._ray = ray
        n, self.d = xb.shape
        self.ntotal = int(n)
        cfg = cfg.validate(n)
        cpus = shard_cpus(cfg.shards, ray_cfg.cpus_per_shard, float(ray.cluster_resources().get("CPU", 0)))
        self.cfg, self.ray_cfg = cfg, dataclasses.replace(ray_cfg, cpus_per_shard=cpus)
        ray_cfg = self.ray_cfg
        self.bounds = shard_bounds(n, cfg.shards)
        trained = train_shard_index(xb, cfg)
        trained_ref = ray.put(trained) if trained is not None else None
        crash = crash_env()
        actor = ray.remote(_Searcher).options(
            num_cpus=ray_cfg.cpus_per_shard,
            max_restarts=ray_cfg.max_restarts,
            max_task_retries=ray_cfg.max_task_retries,
            **({"runtime_env": {"env_vars": crash}} if crash else {}),
        )
        # The driver holds the constructor arguments for the actors' lifetime: a restarted actor is
        # rebuilt from them (Ray frees an object once no reference to it is left).
        self._refs = [trained_ref] + [
            ray.put(np.ascontiguousarray(xb[a:b])) for a, b in zip(self.bounds[:-1], self.bounds[1:])
        ]
        self.actors = []
        with ray_stderr():  # Ray's core logs the restartable actors' object-store arguments to stderr
            for s, a in enumerate(self.bounds[:-1]):
                self.actors.append(
                    actor.remote(
                        self._refs[s + 1],
                        int(a),
                        trained_ref,
                        cfg.nprobe,
                        cfg.overfetch,
                        cfg.list_cover,
                        shard=s,
                        threads=ray_cfg.cpus_per_shard,
                    )
                )
        try:
            got = ray.get([h.ready.remote() for h in self.actors], timeout=ray_cfg.start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise UsageError(
                f"cpus_per_shard {ray_cfg.cpus_per_shard:g}: {cfg.shards} shard actors did not all start "
                f"within {ray_cfg.start_timeout:g} s; the cluster's free CPUs "
                f"({ray.available_resources().get('CPU', 0):g}) may be held by other jobs. Lower "
                f"cpus_per_shard or shards, or wait for the cluster.",
                params=("cpus_per_shard", "shards"),
            ) from None
        if sum(got) != n:
            raise RuntimeError(f"shard actors hold {sum(got)} rows, expected {n}")
        log.info("%d shard actors over %d rows (%s)", len(self.actors), n, cfg.index)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D float32[nq, k], I int64[nq, k]) over the whole gallery, merged from every shard."""
        ray = self._ray
        ref = ray.put(np.ascontiguousarray(xq, dtype=np.float32))
        return merge_topk(ray.get([h.search.remote(ref, int(k)) for h in self.actors]), k)

    def describe(self) -> dict:
        return {
            "engine": "ray",
            **self.cfg.describe(self.ntotal, self.d),
            "cpus_per_shard": self.ray_cfg.cpus_per_shard,
        }

    def close(self) -> None:
        for h in self.actors:
            self._ray.kill(h, no_restart=True)
        self.actors, self._refs = [], []

    def __enter__(self) -> "RayShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
