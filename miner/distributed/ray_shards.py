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

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from cir_mine.data.errors import UsageError
from cir_mine.miner.core.search.topk import merge_topk
from cir_mine.miner.distributed.shards import ShardConfig, ShardSearcher, shard_bounds, train_shard_index

log = logging.getLogger(__name__)

RAY_MISSING = "--engine ray needs Ray, which is not installed: install the 'ray' extra (pip install 'cir-mine[ray]')."


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None   # None: a local cluster started here; 'auto' or HOST:PORT: join one
    cpus_per_shard: float = 1.0     # CPUs each shard actor reserves (its FAISS threads: max(1, floor))
    max_restarts: int = 3           # restarts of a shard actor that dies
    max_task_retries: int = 3       # retries of a search lost with its actor


def require_ray():
    """The ``ray`` module, or UsageError naming the extra."""
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


def connect(address: Optional[str] = None):
    """Join the cluster at ``address`` ('auto', HOST:PORT), or start a local one; reuse a live connection."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"--ray-address {address}: cannot join a Ray cluster ({str(e).splitlines()[0][:200]}). "
                         f"Start one with `ray start --head`, pass its HOST:PORT, or omit --ray-address "
                         f"for a local cluster.") from None
    log.info("Ray cluster: %s", ray.cluster_resources())
    return ray


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

    xb: float32[n, d] unit rows (the gallery). crash_shard / crash_marker: test hook, the actor of
    shard ``crash_shard`` exits on its first search (see ShardSearcher); the run must not notice."""

    def __init__(self, xb: np.ndarray, cfg: ShardConfig = ShardConfig(), ray_cfg: RayConfig = RayConfig(),
                 crash_shard: Optional[int] = None, crash_marker: Optional[str] = None):
        if ray_cfg.cpus_per_shard <= 0 or ray_cfg.max_restarts < 0 or ray_cfg.max_task_retries < 0:
            raise UsageError(f"--cpus-per-shard must be above 0 (got {ray_cfg.cpus_per_shard}).")
        ray = connect(ray_cfg.address)
        self._ray = ray
        n, self.d = xb.shape
        self.ntotal = int(n)
        self.cfg, self.ray_cfg = cfg.validate(n), ray_cfg
        self.bounds = shard_bounds(n, cfg.shards)
        trained = train_shard_index(xb, cfg)
        trained_ref = ray.put(trained) if trained is not None else None
        actor = ray.remote(_Searcher).options(
            num_cpus=ray_cfg.cpus_per_shard, max_restarts=ray_cfg.max_restarts,
            max_task_retries=ray_cfg.max_task_retries)
        # The driver holds the constructor arguments for the actors' lifetime: a restarted actor is
        # rebuilt from them (Ray frees an object once no reference to it is left).
        self._refs = [trained_ref] + [ray.put(np.ascontiguousarray(xb[a:b]))
                                      for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        self.actors = []
        for s, a in enumerate(self.bounds[:-1]):
            self.actors.append(actor.remote(
                self._refs[s + 1], int(a), trained_ref, cfg.nprobe, cfg.overfetch, cfg.list_cover,
                crash_marker=crash_marker if s == crash_shard else None, threads=ray_cfg.cpus_per_shard))
        got = ray.get([h.ready.remote() for h in self.actors])
        if sum(got) != n:
            raise RuntimeError(f"shard actors hold {sum(got)} rows, expected {n}")
        log.info("%d shard actors over %d rows (%s)", len(self.actors), n, cfg.index)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D float32[nq, k], I int64[nq, k]) over the whole gallery, merged from every shard."""
        ray = self._ray
        ref = ray.put(np.ascontiguousarray(xq, dtype=np.float32))
        return merge_topk(ray.get([h.search.remote(ref, int(k)) for h in self.actors]), k)

    def describe(self) -> dict:
        return {"engine": "ray", **self.cfg.describe(self.ntotal, self.d),
                "cpus_per_shard": self.ray_cfg.cpus_per_shard}

    def close(self) -> None:
        for h in self.actors:
            self._ray.kill(h, no_restart=True)
        self.actors, self._refs = [], []

    def __enter__(self) -> "RayShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
