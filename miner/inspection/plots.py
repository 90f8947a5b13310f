"""The mining report's plots (matplotlib's Agg canvas, ``matplotlib.figure.Figure``, no pyplot state)
and the DuckDB queries behind them; each plot function returns a figure, :func:`png_b64` embeds it."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cir_mine.miner.inspection.contact_sheet import clip
from cir_mine.miner.inspection.stats import Stats

SCATTER_MAX = 4000  # points per group in the scatter plot
TOP_NEGATIVES = 15


def png_b64(fig, dpi: int = 100, tight: bool = True) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class Group:
    # fmt: off
    label: str                     # "strategy" or "[i] strategy" with several tables
    delta: np.ndarray              # float64[n]
    score: np.ndarray              # float64[n]
    target_score: np.ndarray       # float64[n]
    category_match: np.ndarray     # bool[n]
    attr_overlap: np.ndarray       # float64[n]
    # fmt: on


def groups_of(con, n_tables: int) -> list[Group]:
    out = []
    for i in range(n_tables):
        for (strategy,) in con.execute(f"SELECT DISTINCT strategy FROM t{i} ORDER BY 1").fetchall():
            a = con.execute(
                f"SELECT delta, score, target_score, category_match, attr_overlap FROM t{i} WHERE strategy = ?",
                [strategy],
            ).fetchnumpy()
            label = strategy if n_tables == 1 else f"[{i}] {strategy}"
            out.append(
                Group(
                    label,
                    *(np.asarray(a[c], np.float64) for c in ("delta", "score", "target_score")),
                    np.asarray(a["category_match"], bool),
                    np.asarray(a["attr_overlap"], np.float64),
                )
            )
    return out


# ----------------------------------------------------------------------------------------------
# Plots (each returns a Figure)


def plot_delta_hist(groups: Sequence[Group]):
    fig = _figure(6.2, 4.2)
    ax = fig.add_subplot()
    allv = np.concatenate([g.delta for g in groups]) if groups else np.zeros(1)
    bins = np.histogram_bin_edges(allv, bins=40)
    for g, c in zip(groups, _colors(len(groups))):
        ax.hist(g.delta, bins=bins, histtype="step", linewidth=1.8, color=c, label=f"{g.label} (n={len(g.delta)})")
    ax.axvline(0, color="#111827", linestyle="--", linewidth=1)
    ax.set_xlabel("Δ = s(q, target) − s(q, negative)   (< 0: ranked above the target)")
    ax.set_ylabel("negatives")
    ax.set_title("Δ per strategy")
    if groups:
        ax.legend(fontsize=8)
    return fig


def plot_scatter(groups: Sequence[Group], seed: int = 0):
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    rng = np.random.default_rng(seed)
    lo, hi = 1.0, -1.0
    for g, c in zip(groups, _colors(len(groups))):
        idx = rng.choice(len(g.delta), size=min(SCATTER_MAX, len(g.delta)), replace=False) if len(g.delta) else []
        ax.scatter(g.target_score[idx], g.score[idx], s=5, alpha=0.45, color=c, label=g.label, linewidths=0)
        if len(g.delta):
            lo = min(lo, g.score.min(), g.target_score.min())
            hi = max(hi, g.score.max(), g.target_score.max())
    ax.plot([lo, hi], [lo, hi], color="#111827", linestyle="--", linewidth=1, label="Δ = 0")
    ax.set_xlabel("s(q, target)")
    ax.set_ylabel("s(q, negative)")
    ax.set_title("negative score vs target score")
    ax.legend(fontsize=8, markerscale=3)
    return fig


def plot_mix(groups: Sequence[Group]):
    from cir_mine.miner.inspection.stats import OVERLAP_BUCKETS

    fig = _figure(8.5, max(2.2, 0.45 * len(groups) + 1.4))
    ax1, ax2 = fig.subplots(1, 2)
    labels = [clip(g.label) for g in groups]
    y = np.arange(len(groups))
    same = np.array([g.category_match.mean() if len(g.delta) else 0 for g in groups])
    ax1.barh(y, same, color="#2563eb", label="same category")
    ax1.barh(y, 1 - same, left=same, color="#f59e0b", label="other category")
    for yi, v in zip(y, same):
        ax1.text(0.02, yi, f"{100 * v:.0f}% same", va="center", ha="left", fontsize=8, color="white")
    ax1.set_yticks(y, labels)
    ax1.set_xlim(0, 1)
    ax1.invert_yaxis()
    ax1.set_title("category mix")
    ax1.legend(fontsize=7, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    left = np.zeros(len(groups))
    for (lab, lo, hi), c in zip(OVERLAP_BUCKETS, ["#e5e7eb", "#93c5fd", "#3b82f6", "#1e3a8a"]):
        share = np.array(
            [((g.attr_overlap >= lo) & (g.attr_overlap < hi)).mean() if len(g.delta) else 0 for g in groups]
        )
        ax2.barh(y, share, left=left, color=c, label=lab)
        left += share
    ax2.set_yticks(y, [""] * len(y))
    ax2.set_xlim(0, 1)
    ax2.invert_yaxis()
    ax2.set_title("attribute overlap with the target (Jaccard)")
    ax2.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    return fig


def plot_per_query(con, stats: Stats):
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot()
    cols = _colors(len(stats.tables))
    ticks: set = set()
    for i, (s, c) in enumerate(zip(stats.tables, cols)):
        n = con.execute(f"SELECT count(*) AS n FROM t{i} GROUP BY query_id").fetchnumpy()["n"]
        vals, counts = np.unique(n, return_counts=True)
        none = s.mined_queries - s.queries if s.mined_queries is not None else 0
        if none > 0:  # mined queries that got no row at all
            vals, counts = np.concatenate([[0], vals]), np.concatenate([[none], counts])
        ticks.update(vals.tolist())
        w = 0.8 / len(stats.tables)
        ax.bar(
            vals + (i - (len(stats.tables) - 1) / 2) * w,
            counts,
            width=w,
            color=c,
            label=f"[{i}] k={s.k if s.k is not None else '?'}, shortfall {s.shortfall['count']}",
        )
    from matplotlib.ticker import MaxNLocator

    if len(ticks) <= 12:
        ax.set_xticks(sorted(ticks))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_xlabel("negatives per query")
    ax.set_ylabel("queries (log)")
    ax.set_title("negatives per query")
    ax.legend(fontsize=8)
    return fig


def top_negatives(con, has_gallery: bool, limit: int = TOP_NEGATIVES) -> list[tuple]:
    """(neg_id, category, times_mined, queries, mean_delta), most mined first, over all tables."""
    cat = (
        (
            "LEFT JOIN (SELECT image_id, any_value(category) AS category FROM gallery GROUP BY 1) g "
            "ON g.image_id = n.neg_id"
        )
        if has_gallery
        else ""
    )
    return con.execute(
        f"SELECT n.neg_id, {'g.category' if has_gallery else 'NULL'} AS category, count(*) AS times_mined, "
        f"count(DISTINCT n.query_id) AS queries, avg(n.delta) AS mean_delta FROM negs n {cat} "
        f"GROUP BY 1, 2 ORDER BY times_mined DESC, n.neg_id LIMIT {int(limit)}"
    ).fetchall()


def plot_top_negatives(rows: Sequence[tuple]):
    fig = _figure(5.6, max(2.0, 0.24 * len(rows) + 1.0))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y, [r[2] for r in rows], color="#7c3aed")
    ax.set_yticks(y, [clip(f"{r[0]} ({r[1]})" if r[1] else str(r[0])) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("times mined (all tables)")
    ax.set_title("most frequently mined negatives")
    return fig


def plot_overlap(stats: Stats):
    n = len(stats.tables)
    fig = _figure(1.2 * n + 2.2, 1.0 * n + 1.4)
    ax = fig.add_subplot()
    im = ax.imshow(stats.overlap, vmin=0, vmax=1, cmap="Blues")
    for i in range(n):
        for j in range(n):
            v = stats.overlap[i, j]
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8, color="white" if v > 0.5 else "black")
    labels = [f"[{i}] r{','.join(map(str, s.rounds))}" for i, s in enumerate(stats.tables)]
    ax.set_xticks(range(n), labels, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_title("overlap of (query, negative) pairs (Jaccard)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def plot_hardness(con, stats: Stats):
    n = len(stats.tables)
    fig = _figure(max(5.0, 1.1 * n + 2.5), 3.4)
    ax = fig.add_subplot()
    data = [con.execute(f"SELECT delta FROM t{i}").fetchnumpy()["delta"].astype(np.float64) for i in range(n)]
    ax.boxplot(data, showfliers=False)
    above = [float((d < 0).mean()) if len(d) else 0.0 for d in data]
    ax.set_xticks(
        range(1, n + 1),
        [
            f"[{i}] r{','.join(map(str, s.rounds))}\n{100 * a:.1f}% Δ<0"
            for i, (s, a) in enumerate(zip(stats.tables, above))
        ],
        fontsize=8,
    )
    ax.axhline(0, color="#111827", linestyle="--", linewidth=1)
    ax.set_ylabel("Δ")
    ax.set_title("hardness per table / round (box: quartiles, whiskers 1.5 IQR)")
    return fig


# ----------------------------------------------------------------------------------------------
# HTML
