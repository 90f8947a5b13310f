"""Mine a split's negatives into one table file, through any search engine: the call behind
``cir-mine negatives``.

:func:`mine_file` takes the mining config (:class:`MineConfig`), the engine (:class:`EngineConfig`:
the mining core's own search in this process, the gallery's shards in this process, or shards on
Ray actors) and the source of the query embeddings (none: zero-shot; :class:`QueryFile`: a .npy of
your model's; :class:`cir_mine.train.checkpoint.CheckpointQueries`: a cir-train run's model). Every
option and the output path are checked before the slow work; the table is written atomically under
the lock of its directory, with what produced it in its footer. :func:`switch_off` switches guards off
by the names a user gives them (GUARD_SWITCHES); :func:`summary` and :func:`stages_line` describe a
mined table in text.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from cir_mine.data.errors import UsageError
from cir_mine.data.fields import field_default
from cir_mine.data.io import check_output, write_job
from cir_mine.data.workspace import Workspace
from cir_mine.miner.core.guards import GuardConfig
from cir_mine.miner.core.assemble import seconds
from cir_mine.miner.core.mine import MineConfig, MineResult, mine_negatives, write_result
from cir_mine.miner.distributed.mine import EngineConfig


# a guard's name, as a user switches it off -> the GuardConfig field that does (False, or None for a threshold)
GUARD_SWITCHES = {
    "target": "exclude_target",
    "reference": "exclude_reference",
    "extra-positive": "exclude_extra_positives",
    "near-duplicate": "dup_threshold",
    "cap": "rho",
    "trust-verified": "trust_verified",
}


def switch_off(cfg: MineConfig, no_guard: Sequence[str] = (), no_deepen: bool = False) -> MineConfig:
    """``cfg`` with the guards named in ``no_guard`` (keys of GUARD_SWITCHES) switched off, and with
    ``no_deepen`` short queries never searched again (``max_candidates=None``)."""
    bad = [g for g in no_guard if g not in GUARD_SWITCHES]
    if bad:
        raise UsageError(f"`no_guard` {bad[0]!r}: use one of {', '.join(GUARD_SWITCHES)}.", params=("no_guard",))
    off = {GUARD_SWITCHES[g]: off_value(GUARD_SWITCHES[g]) for g in no_guard}
    return cfg.replace(**off, **({"max_candidates": None} if no_deepen else {}))


def off_value(field: str) -> Optional[bool]:
    """The value that switches the guard field ``field`` off: False for a switch, None for a threshold."""
    return False if isinstance(field_default(GuardConfig, field), bool) else None


class QuerySource(Protocol):
    """Where query embeddings come from: the files it reads (never written over) and the embeddings,
    float32[n_queries, d] in the split's triplets order. ``loaded()`` reads the split (once)."""

    reads: Sequence[Path]

    def embeddings(self, ws: Workspace, split: str, loaded: Callable[[], tuple]) -> np.ndarray: ...


@dataclass(frozen=True)
class QueryFile:
    """Your model's query embeddings: a .npy float32[n_queries, d] in the triplets' row order, or in
    any order named by ``ids`` (a text file with one query id per line, or a JSON list)."""

    path: Path
    ids: Optional[Path] = None

    @property
    def reads(self) -> tuple:
        return (self.path,) if self.ids is None else (self.path, self.ids)

    def embeddings(self, ws: Workspace, split: str, loaded: Callable[[], tuple]) -> np.ndarray:
        from cir_mine.miner.core.query_emb import read_query_embeddings, read_query_ids

        g, t = loaded()
        given = read_query_ids(self.ids) if self.ids is not None else None
        return read_query_embeddings(self.path, t.query_ids.tolist(), g.dim, given)


def mine_file(
    ws: Workspace | str | Path,
    split: str,
    cfg: MineConfig,
    out: str | Path,
    *,
    engine: EngineConfig = EngineConfig(),
    queries: Optional[QuerySource] = None,
    mining_round: int = 0,
    overwrite: bool = False,
    progress: Optional[Callable[..., None]] = None,
) -> MineResult:
    """Mine every query of ``ws``/``split`` with ``cfg`` through ``engine`` and write the table to ``out``.

    ``queries``: where the query embeddings come from (None: zero-shot, normalize(ref + w * text));
    given, the table records them as passed in (``query='checkpoint'``). ``out`` is checked before
    the queries are embedded (:func:`cir_mine.data.io.check_output`: never a workspace file or an
    input, an existing file only with ``overwrite``). ``progress(n, total=None)``: n more queries
    finished; the total is given once, when the split is read."""
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    if queries is not None and cfg.query != "checkpoint":
        cfg = cfg.replace(query="checkpoint")
    cfg.validate(mining_round)
    engine.validate(cfg)
    ws.require()
    reads = tuple(queries.reads) if queries is not None else ()
    out = check_output(out, reads, overwrite)
    read_s = []  # the seconds of the split's one read, here before mining

    @functools.cache
    def loaded() -> tuple:
        t = time.perf_counter()
        data = ws.load(split)
        read_s.append(time.perf_counter() - t)
        return data

    query_emb = queries.embeddings(ws, split, loaded) if queries is not None else None
    with write_job(out.parent, f"cir-mine negatives -> {out.name}"):
        if progress is not None:
            progress(0, total=len(loaded()[1].query_ids))
        kw = dict(query_emb=query_emb, mining_round=mining_round, progress=progress, loaded=loaded())
        if engine.in_process:
            from cir_mine.miner.accel.open import device_search

            res = mine_negatives(ws, split, cfg, index=device_search, **kw)  # the one device rule's back-end
        else:
            from cir_mine.miner.distributed.mine import mine_with_engine

            res = mine_with_engine(ws, split, cfg, engine.name, engine.shard, engine.ray, **kw)
        timing = res.meta.setdefault("timing", {})
        timing["read_s"] = seconds(timing.get("read_s", 0.0) + sum(read_s))
        timing["total_s"] = seconds(timing.get("total_s", 0.0) + sum(read_s))
        return write_result(res, out)


def summary(out: str | Path, meta: dict) -> str:
    """What a mined table holds, in lines of text: rows, shortfall (with hints named as
    ``MineConfig.of(...)``), rows per strategy, guard removals, the search back-end."""
    parts = ",".join(f"{p['strategy']}:{p['k']}" for p in meta["parts"])
    rows = ", ".join(f"{p['strategy']} {p['rows']}" for p in meta["parts"])
    sf = meta["shortfall"]
    guards = ", ".join(f"{g} {v['removed']}" for g, v in meta["guards"].items())
    lines = [
        f"wrote {out}: {meta['n_rows']} rows for {meta['n_queries']} queries (k={meta['k']}: {parts}; "
        f"bank {meta['bank']}; {meta['timing']['total_s']:.1f}s)",
        f"shortfall: {sf['count']} queries got fewer than {meta['k_mined']} negatives ({sf['missing']} missing)"
        + (f", e.g. {', '.join(sf['query_ids'][:5])}" if sf["count"] else ""),
        f"rows per strategy: {rows}",
        f"guards removed: {guards}",
    ]
    if sf["count"]:
        lines.append("to loosen: " + "; ".join(sf["hints"]))
    lines += _search_lines(meta.get("search") or {})
    return "\n".join(lines)


def _search_lines(search: dict) -> list:
    """The search back-end, its tuning and its recall check, one line each (none for exact search
    without a check)."""
    lines = []
    params = ", ".join(f"{k}={v}" for k, v in (search.get("params") or {}).items())
    if search and not search.get("exact", True):
        line = (
            f"search: {search.get('index')} ({search.get('factory')}{', ' + params if params else ''}; "
            f"over-fetch {search.get('overfetch', 1):g}, re-ranked exactly)"
        )
        tu = search.get("tuning")
        if tu:
            line += (
                f"; tuned {tu['param']}={tu['value']}: candidate recall@{tu['depth']} {tu['recall']:.3f} on "
                f"{tu['queries']} queries ({'reached' if tu['reached'] else 'below'} {tu['target']:g})"
            )
            deep = tu.get("deep")
            if deep:
                line += (
                    f"; {tu['param']}={deep['value']} at depth {deep['depth']}, every search probes so: candidate recall "
                    f"{deep['recall']:.3f} ({'reached' if deep['reached'] else 'below'} {tu['target']:g})"
                )
        lines.append(line)
    ck = search.get("check")
    if ck:
        rec = f"candidate recall@{ck['depth']} {ck['candidate_recall']:.3f}, " if "candidate_recall" in ck else ""
        lines.append(
            f"recall check on {ck['queries']} queries: {rec}"
            f"mined negatives shared with exact mining {ck['negative_overlap']:.3f}"
        )
    return lines


def stages_line(meta: dict) -> str:
    """The run's seconds per stage (the footer's timing), and the kernel race when one ran."""
    t = meta.get("timing") or {}
    names = ("read", "prepare", "search", "rerank", "guards", "select", "table", "write")
    line = (
        "stages: "
        + ", ".join(f"{n} {t[n + '_s']:.2f}s" for n in names if n + "_s" in t)
        + f" (total {t.get('total_s', 0):.2f}s)"
    )
    kernels = t.get("kernels")
    if kernels:
        line += "; kernels (us/query): " + "; ".join(
            f"{shape} " + ", ".join(f"{k} {v:g}" for k, v in per.items()) for shape, per in kernels.items()
        )
    return line
