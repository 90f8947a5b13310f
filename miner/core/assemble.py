"""Step 6 of a mining run (assemble): the negatives table (rows as ids) and its footer metadata."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cir_mine.data.rows import gather
from cir_mine.data.workspace import Workspace, library_versions
from cir_mine.miner.core.config import MineConfig
from cir_mine.miner.core.curriculum import parse_schedule
from cir_mine.miner.core.guards import shortfall_hints
from cir_mine.miner.core.prepare import Pool, Prepared, QuerySet
from cir_mine.miner.core.schedule import Mined
from cir_mine.miner.core.search.measure import core_pool
from cir_mine.miner.core.strategies import REGISTRY
from cir_mine.miner.core.tables import NEGATIVES_SCHEMA

MAX_GUARDS_PER_QUERY = 1000  # short queries whose guard counts the footer keeps (guards_per_query)


def stage_seconds(prep: Prepared, mined: Mined, before: dict, after: dict, t_prep: float, t_table: float) -> dict:
    """Seconds per stage of a run (the footer's ``timing``; ``cir-mine negatives -v`` prints them):
    read (the workspace), prepare (queries, pools, the back-end), search (candidate kernels), rerank
    (exact scores and cuts), guards, select (the strategies and the rest of the mining loop), table
    (assembling the rows); deepen is the part of search to table spent on queries searched again.
    With prefetch the search overlaps the other stages, so they add up to more than the wall time."""
    spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("search", "rerank")}
    search = spent["search"] if after else mined.search_s
    guards = prep.clock.snapshot().get("guards", 0.0)
    read = prep.clock.snapshot().get("read", 0.0)
    # the mining thread's seconds (prefetch or not) less the guards and the searches a strategy ran
    # itself (its target's neighbours: the back-end's seconds beyond those of the batches' searches)
    nested = max(0.0, spent["search"] + spent["rerank"] - mined.search_s) if after else 0.0
    select = max(0.0, mined.select_s - guards - nested)
    return {
        "read_s": seconds(read),
        "prepare_s": seconds(t_prep - read),
        "search_s": seconds(search),
        "rerank_s": seconds(spent["rerank"]),
        "guards_s": seconds(guards),
        "select_s": seconds(select),
        "deepen_s": seconds(mined.deepen_s),
        "table_s": seconds(t_table),
    }


def footer(
    ws: Workspace,
    split: str,
    cfg: MineConfig,
    prep: Prepared,
    mined: Mined,
    table: pa.Table,
    mining_round: int,
    zero_shot: bool,
    search_meta: dict,
    timing: dict,
) -> dict:
    """Step 6 (assemble): the table's footer metadata."""
    parts, ks, k_mined = prep.parts, prep.ks, prep.k_mined
    part_rows = np.bincount(
        np.concatenate(mined.out["part"]).astype(np.int64) if mined.out["part"] else np.zeros(0, np.int64),
        minlength=len(parts),
    )
    short = np.flatnonzero(mined.got < k_mined)
    missing = int((k_mined - mined.got[short]).sum())
    empty = pa.array(short[mined.got[short] == 0])  # short queries with no row in the table
    bank = "in-batch" if k_mined == 0 else ("mined+in-batch" if any(n == "in-batch" for n, _ in parts) else "mined")
    ws.check_unchanged(split, prep.g.data_hash, "mined")  # the hashes below are of the data mined, or no table
    data_hash = prep.g.data_hash or ws.split_hash(split)
    return {
        "config": cfg.to_dict(),
        "manifest_hash": ws.manifest_hash(),
        "workspace": str(ws.root),
        "split": split,
        "data_hash": data_hash,
        "round": int(mining_round),
        "bank": bank,
        "query_source": "zero-shot" if zero_shot else "provided",
        "parts": [
            {"strategy": n, "share": w, "k": ki, "rows": int(part_rows[si])}
            for si, ((n, w), ki) in enumerate(zip(parts, ks))
        ],
        "schedule": parse_schedule(cfg.schedule) if cfg.schedule else None,
        "prepared": prep.prepared,
        "k": cfg.k,
        "k_mined": k_mined,
        "depth": mined.depth if prep.need_ranked else 0,
        "deepened_queries": mined.deepened,
        "n_queries": prep.m,
        "n_gallery": len(prep.g),
        "n_rows": table.num_rows,
        "shortfall": {
            "count": int(short.size),
            "query_ids": [str(x) for x in prep.qs.ids.take(pa.array(short)).to_pylist()],
            "missing": missing,
            "without_negatives": {
                name: [str(x) for x in col.take(empty).to_pylist()]
                for name, col in (
                    ("query_ids", prep.qs.ids),
                    ("ref_ids", prep.qs.ref_ids),
                    ("target_ids", prep.qs.target_ids),
                )
            },
            "hints": shortfall_hints(
                {g: int(c[short].sum()) for g, c in mined.guard_counts.items()},
                missing,
                cfg.guards,
                [f"{n}: {REGISTRY[n].hint}" for n, _, _ in prep.mined if REGISTRY[n].hint],
            ),
        },
        "guards_per_query": {
            str(prep.qs.ids[int(i)]): {g: int(c[i]) for g, c in mined.guard_counts.items()}
            for i in short[:MAX_GUARDS_PER_QUERY]
        },
        "guards": {
            name: {"removed": int(c.sum()), "queries": int((c > 0).sum()), "max_per_query": int(c.max(initial=0))}
            for name, c in mined.guard_counts.items()
        },
        "search": search_meta,
        "timing": timing,
        "versions": library_versions(),
    }


def seconds(x: float) -> float:
    return float(f"{x:.3f}")


def assemble_table(pool: Pool, qs: QuerySet, parts, out: dict, mining_round: int, seed: int) -> pa.Table:
    cat = lambda k, dt: np.concatenate(out[k]) if out[k] else np.zeros(0, dt)
    q, row, part = cat("q", np.int64), cat("row", np.int64), cat("part", np.int8)
    # rows come out batch by batch and part by part: order them by query, then part, then pick order
    # (a single pass of one strategy already comes out in that order)
    key = q * (int(part.max(initial=0)) + 1) + part
    order = slice(None) if bool((key[1:] >= key[:-1]).all()) else np.lexsort((np.arange(q.size), part, q))
    q, row, part = q[order], row[order], part[order]
    rank, score, overlap = (
        cat("rank", np.int32)[order],
        cat("score", np.float32)[order],
        cat("overlap", np.float32)[order],
    )
    target_rows = qs.target_rows[q]
    ts = qs.target_score[q]
    names = pa.array([n for n, _ in parts], pa.string())
    qa, ra = pa.array(q), pa.array(row)
    # the string columns, gathered on one thread per core (Arrow's take releases the GIL)
    strings = [
        (qs.ids, qa),
        (qs.ref_ids, qa),
        (qs.target_ids, qa),
        (pool.ids, ra),
        (pa.array(pool.cat_names, pa.string()), pool.cat[row].astype(np.int64)),
        (names, part.astype(np.int64)),
    ]
    query_id, ref_id, target_id, negative_id, neg_category, strategy = core_pool("cir-mine-table").map(
        lambda job: gather(*job), strings
    )
    return pa.Table.from_arrays(
        [
            query_id,
            ref_id,
            target_id,
            negative_id,
            neg_category,
            strategy,
            pa.array(rank, pa.int32()),
            pa.array(score, pa.float32()),
            pa.array(ts, pa.float32()),
            pa.array(ts - score, pa.float32()),
            pa.array(np.full(q.size, mining_round, np.int32)),
            pa.array(pool.cat[row] == pool.cat[target_rows]),
            pa.array(overlap, pa.float32()),
            pa.array(np.full(q.size, seed, np.int64)),
        ],
        schema=NEGATIVES_SCHEMA,
    )
