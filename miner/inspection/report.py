"""The mining report: one self-contained HTML file (plots as base64 PNGs) about negatives tables.

Sections: the tables and their numbers; Δ histogram per strategy; score vs target score; category
and attribute-overlap mix; negatives per query and shortfall; the most frequently mined negatives;
with several tables (refresh rounds) the round-to-round overlap and hardness; a few contact sheets.

``build_report`` gathers the data through DuckDB (cir_mine.miner.inspection) and draws with matplotlib's Agg
canvas (``matplotlib.figure.Figure``, no pyplot state); ``write_report`` writes the HTML atomically.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cir_mine.data.io import atomic_path, check_output, write_job
from cir_mine.miner.inspection.stats import Stats, format_stats, stats_of
from cir_mine.miner.inspection.sql import open_tables
from cir_mine.miner.inspection.contact_sheet import check_sheet_size, clip, render_sheet, sheet_rows
from cir_mine.miner.inspection.plots import (
    groups_of,
    plot_delta_hist,
    plot_hardness,
    plot_mix,
    plot_overlap,
    plot_per_query,
    plot_scatter,
    plot_top_negatives,
    SCATTER_MAX,
    png_b64,
    top_negatives,
)

log = logging.getLogger(__name__)


@dataclass
class Report:
    # fmt: off
    html: str
    plots: list = field(default_factory=list)     # names of the embedded plots, in order
    stats: Optional[Stats] = None
    # fmt: on


CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #111827; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #e5e7eb; padding-bottom: 4px; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
td, th { border: 1px solid #e5e7eb; padding: 3px 8px; text-align: left; } th { background: #f3f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { max-width: 100%; border: 1px solid #e5e7eb; margin: 6px 0; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; } .row > div { flex: 0 1 auto; }
.row img.plot { max-width: 580px; }
.muted { color: #6b7280; font-size: 0.9em; } pre { background: #f9fafb; padding: 8px; overflow-x: auto; font-size: 0.8em; }
"""


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f'<td class="num">{v:.4f}</td>'
        if isinstance(v, (int, np.integer)):
            return f'<td class="num">{v}</td>'
        return f"<td>{html.escape(clip(v, 200))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class _Doc:
    def __init__(self):
        self.parts: list[str] = []
        self.plots: list[str] = []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def plot(self, name: str, fig, alt: str, tight: bool = True) -> None:
        self.plots.append(name)
        self.add(
            f'<img class="plot" id="plot-{name}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{png_b64(fig, tight=tight)}">'
        )


def _tables_section(doc: "_Doc", stats, tables) -> None:
    """The tables compared: one row of numbers each, and each one's config and metadata."""
    doc.add("<h2 id='tables'>Tables</h2>")
    doc.add(
        _table(
            [
                "#",
                "file",
                "rows",
                "queries",
                "k",
                "rounds",
                "strategies",
                "shortfall",
                "median Δ",
                "same category",
                "mean attr overlap",
            ],
            [
                [
                    i,
                    Path(s.path).name,
                    s.rows,
                    s.queries,
                    s.k if s.k is not None else "?",
                    ", ".join(map(str, s.rounds)),
                    ", ".join(f"{k} {v}" for k, v in s.strategies.items()),
                    s.shortfall["count"],
                    s.delta_quantiles[0.5],
                    s.category_match,
                    s.attr_overlap_mean,
                ]
                for i, s in enumerate(stats.tables)
            ],
        )
    )
    for i, t in enumerate(tables):
        doc.add(
            f"<details><summary class='muted'>[{i}] {html.escape(str(t.path))}: mining config and metadata"
            f"</summary><pre>{html.escape(json.dumps(t.meta, indent=1, sort_keys=True, default=str)[:20000])}"
            f"</pre></details>"
        )


def _shortfall_section(doc: "_Doc", con, stats) -> None:
    """Negatives per query, the queries short of k, what to loosen and what the guards removed."""
    doc.add("<h2 id='shortfall'>Negatives per query and shortfall</h2>")
    doc.add("<div class='row'><div>")
    doc.plot("per_query", plot_per_query(con, stats), "negatives per query")
    doc.add("</div><div style='max-width: 560px'>")
    for i, s in enumerate(stats.tables):
        ids = s.shortfall["query_ids"]
        listed = ", ".join(html.escape(q) for q in ids[:12]) + (f" … (+{len(ids) - 12})" if len(ids) > 12 else "")
        doc.add(
            f"<p>[{i}] {s.shortfall['count']} queries got fewer than k={s.k if s.k is not None else '?'} "
            f"negatives{': ' + listed if ids else '.'}</p>"
        )
        if s.shortfall["count"] and s.shortfall["hints"]:
            doc.add(f"<p class='muted'>[{i}] to loosen: {html.escape('; '.join(s.shortfall['hints']))}</p>")
        if s.guards:
            doc.add(
                f"<p class='muted'>[{i}] guards removed: "
                f"{html.escape(', '.join(f'{k} {v}' for k, v in s.guards.items()))}</p>"
            )


def _sheets_section(
    doc: "_Doc", tables, ws, split: str, root, n_sheet_queries: int, max_negatives: int, seed: int
) -> None:
    """Contact sheets of the same sampled queries in the first and the last table."""
    doc.add(
        "<h2 id='sheets'>Contact sheets</h2><p class='muted'>Reference, target, then negatives in rank order "
        "with Δ, score, category; red +: attributes the negative has and the target lacks, blue −: target "
        "attributes the negative lacks.</p>"
    )
    # the same queries in the first and the last table, so the refresh is visible
    picks = [0] if len(tables) == 1 else [0, len(tables) - 1]
    import pyarrow.compute as pc

    uniq = [pc.unique(tables[i].table.column("query_id")).to_pylist() for i in picks]
    shared = set.intersection(*(set(u) for u in uniq))
    order = uniq[0]
    first = [q for q in order if q in shared]
    rng = np.random.default_rng(seed)
    qs = [first[i] for i in np.sort(rng.choice(len(first), size=min(n_sheet_queries, len(first)), replace=False))]
    for i in picks:
        rows = sheet_rows(tables[i], ws, split, qs, Path(root) if root is not None else None, max_negatives)
        doc.add(f"<h3>[{i}] {html.escape(Path(tables[i].path).name)}</h3>")
        doc.plot(f"sheet{i}", render_sheet(rows, "", max_negatives), f"contact sheet of table {i}", tight=False)


def build_report(
    neg_paths: Sequence[str | Path],
    work: str | Path,
    split: Optional[str] = None,
    root: Optional[str | Path] = None,
    n_sheet_queries: int = 3,
    max_negatives: int = 6,
    seed: int = 0,
) -> Report:
    """Gather the numbers and plots of ``neg_paths`` (all from workspace ``work``) into HTML."""
    if n_sheet_queries > 0:
        check_sheet_size(n_sheet_queries, max_negatives, "n_sheet_queries")
    con, tables, ws, split = open_tables(neg_paths, work, split)
    stats = stats_of(con, tables, has_gallery=True)
    groups = groups_of(con, len(tables))
    doc = _Doc()
    doc.add(
        f"<h1>cir-mine negatives report</h1><p class='muted'>workspace {html.escape(str(ws.root))} "
        f"(manifest {ws.manifest_hash()}), split {html.escape(split)}</p>"
    )

    _tables_section(doc, stats, tables)

    doc.add(
        "<h2 id='delta'>Δ per strategy, score vs target score</h2><p class='muted'>Δ = s(q, target) − "
        "s(q, negative). Large Δ: easy negatives; Δ near or below 0: hard negatives or false negatives. In the "
        f"scatter, points above the diagonal rank above their target (at most {SCATTER_MAX} per strategy).</p>"
        "<div class='row'><div>"
    )
    doc.plot("delta", plot_delta_hist(groups), "Δ histogram per strategy")
    doc.add("</div><div>")
    doc.plot("scatter", plot_scatter(groups, seed), "negative score vs target score")
    doc.add("</div></div>")
    doc.add("<h2 id='mix'>Category and attribute-overlap mix</h2>")
    doc.plot("mix", plot_mix(groups), "category and attribute overlap mix")

    _shortfall_section(doc, con, stats)

    doc.add("</div></div><h2 id='top'>Most frequently mined negatives</h2><div class='row'><div>")
    top = top_negatives(con, has_gallery=True)
    doc.plot("top_negatives", plot_top_negatives(top), "most frequently mined negatives")
    doc.add("</div><div>" + _table(["neg_id", "category", "times mined", "queries", "mean Δ"], top) + "</div></div>")

    if len(tables) > 1:
        doc.add(
            "<h2 id='rounds'>Round-to-round overlap and hardness</h2><p class='muted'>Jaccard overlap of the "
            "(query_id, neg_id) pairs of every two tables; hardness as the Δ distribution per table.</p>"
        )
        doc.add("<div class='row'><div>")
        doc.plot("overlap", plot_overlap(stats), "round-to-round overlap")
        doc.add("</div><div>")
        doc.plot("hardness", plot_hardness(con, stats), "hardness per round")
        doc.add("</div></div>")

    if n_sheet_queries > 0:
        _sheets_section(doc, tables, ws, split, root, n_sheet_queries, max_negatives, seed)

    doc.add("<h2 id='numbers'>All numbers</h2><pre>" + html.escape(format_stats(stats)) + "</pre>")
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>cir-mine report</title>"
        f"<style>{CSS}</style></head><body>{''.join(doc.parts)}</body></html>\n"
    )
    return Report(page, doc.plots, stats)


def write_report(
    neg_paths: Sequence[str | Path],
    work: str | Path,
    out: str | Path,
    overwrite: bool = False,
    split: Optional[str] = None,
    root: Optional[str | Path] = None,
    n_sheet_queries: int = 3,
    max_negatives: int = 6,
    seed: int = 0,
) -> Report:
    """``cir-mine report``: build the report (:func:`build_report`) and write ``out`` atomically (checked
    first, see :func:`cir_mine.data.io.check_output`; an existing ``out`` only with ``overwrite``)."""
    if n_sheet_queries > 0:
        check_sheet_size(n_sheet_queries, max_negatives, "n_sheet_queries")
    out = check_output(out, list(neg_paths), overwrite)
    with write_job(out.parent, f"cir-mine report -> {out.name}"):
        rep = build_report(
            neg_paths,
            work,
            split=split,
            root=root,
            n_sheet_queries=n_sheet_queries,
            max_negatives=max_negatives,
            seed=seed,
        )
        with atomic_path(out) as tmp:
            Path(tmp).write_text(rep.html, encoding="utf-8")
    return rep
