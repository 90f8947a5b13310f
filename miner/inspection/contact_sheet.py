"""Contact sheets: one row per query (reference, caption, target, then the negatives in rank order).

Each negative is labelled with its Δ, score, category and the attributes that differ from the
target; the guards that removed candidates are listed with the caption (per query when the table
records per-query counts, else the whole table's totals). Thumbnails come from the gallery ``path``
column, relative to ``root`` (default: the dataset root ``cir-mine embed`` recorded); a workspace
without image paths (feature-only, e.g. fiq-proxy) gets the same layout with attribute text cards.

``sheet_rows`` gathers the data (no drawing); ``render_sheet`` returns a matplotlib Figure (Agg);
``contact_sheet`` does both and writes the PNG.
"""

from __future__ import annotations

import io
import logging
import tarfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.records import image_file
from cir_mine.data.webdataset import MEMBER_SEP, is_member, read_member, split_member
from cir_mine.data.workspace import Gallery, Workspace
from cir_mine.miner.core.tables import NegativesTable, read_negatives

log = logging.getLogger(__name__)

TILE_IN = 1.75  # tile width in inches
THUMB_PX = 192  # thumbnail size (longest side) in pixels
ROLE_COLORS = {"reference": "#6b7280", "target": "#16a34a", "negative": "#dc2626"}


@dataclass
class Tile:
    # fmt: off
    role: str                          # reference | target | negative
    image_id: str
    category: str
    attributes: list                   # group:value strings of the image
    image: Optional[Path]              # image file, None for a text card
    lines: list                        # label lines under the tile
    plus: list = field(default_factory=list)   # attributes the image has and the target lacks
    minus: list = field(default_factory=list)  # target attributes the image lacks
    # fmt: on


@dataclass
class SheetRow:
    # fmt: off
    query_id: str
    captions: list
    tiles: list                        # [reference, target, negatives...]
    guards: dict                       # guard -> candidates removed
    guards_scope: str                  # "query" or "table"
    short: Optional[str] = None        # "2 of 10 negatives" when the query got fewer than k
    # fmt: on


def guard_counts(meta: dict, query_id: Optional[str] = None) -> tuple[dict, str]:
    """Guard counts from a table's metadata: per query when recorded, else the table's totals.

    Accepts ``guards: {name: n | {"removed": n}}`` and ``guards_per_query: {query_id: {name: n}}``.
    Returns ({guard: n}, "query" | "table"); ({}, "table") when the table records none.
    """
    per_q = meta.get("guards_per_query") or {}
    if query_id is not None and query_id in per_q:
        return {g: int(n) for g, n in per_q[query_id].items()}, "query"
    tot = meta.get("guards") or {}
    return {g: int(v.get("removed", 0) if isinstance(v, dict) else v) for g, v in tot.items()}, "table"


def attribute_diff(attrs: Sequence[str], target_attrs: Sequence[str]) -> tuple[list, list]:
    """(attributes only the image has, target attributes the image lacks), each sorted."""
    a, t = set(attrs), set(target_attrs)
    return sorted(a - t), sorted(t - a)


MAX_QUERIES = 100  # queries one sheet draws at most (a band each)
MAX_NEGATIVES = 50  # negatives drawn per query at most (a tile each)
LABEL_CHARS = 48  # characters of a label drawn on a sheet or plot (ids, categories, attributes)


def clip(text, n: int = LABEL_CHARS) -> str:
    """``text`` cut to ``n`` characters ("…" marks the cut): a label of any length draws in constant time."""
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def check_sheet_size(n_queries: int, max_negatives: int, what: str = "sample") -> None:
    """A sheet of ``n_queries`` bands of ``max_negatives`` tiles stays drawable (UsageError otherwise)."""
    if n_queries > MAX_QUERIES:
        raise UsageError(
            f"{what} {n_queries}: a contact sheet draws at most {MAX_QUERIES} queries. Draw fewer, or "
            f"several sheets (another seed).",
            params=(what,),
        )
    if not 1 <= max_negatives <= MAX_NEGATIVES:
        raise UsageError(f"max_negatives {max_negatives}: must be in 1..{MAX_NEGATIVES}.", params=("max_negatives",))


def pick_queries(
    nt: NegativesTable, query_ids: Sequence[str] = (), sample: Optional[int] = None, seed: int = 0
) -> list[str]:
    """The queries to draw: ``query_ids`` (each in the table, or a short query that got none) or
    ``sample`` random ones of the table."""
    import pyarrow.compute as pc

    have = pc.unique(nt.table.column("query_id")).to_pylist()  # in table order
    if query_ids and sample:
        raise UsageError("pass either query_id or sample, not both.", params=("query_id", "sample"))
    if query_ids:
        known = set(have) | set((nt.meta.get("shortfall") or {}).get("query_ids") or ())
        for q in query_ids:
            if q not in known:
                raise DataError(
                    f"{nt.path}: query id '{q}' has no negatives in this table. "
                    f'List the queries with `cir-mine sql "SELECT DISTINCT query_id FROM negs" {nt.path}`.'
                )
        check_sheet_size(len(query_ids), 1, "query_id")
        return list(query_ids)
    if not sample or sample < 1:
        raise UsageError("pass query_id ID (repeatable) or sample N.", params=("query_id", "sample"))
    check_sheet_size(sample, 1)
    if not have:
        raise DataError(f"{nt.path}: the table has no rows; nothing to draw.")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(have), size=min(sample, len(have)), replace=False))
    return [have[i] for i in idx]


def _image_path(g: Gallery, row: int, root: Optional[Path]):
    """The image file of gallery ``row`` (a Path; for a webdataset ``TAR::MEMBER`` path, the member's
    bytes as a file object): its ``path``, relative to ``root`` unless absolute
    (workspaces embedded before paths were stored relative to the dataset root hold paths relative
    to the directory embed ran in: those still resolve from that directory)."""
    if g.paths is None or not g.paths[row]:
        return None
    if is_member(g.paths[row]):  # an image inside a webdataset tar shard
        tar, member = split_member(g.paths[row])
        try:
            return io.BytesIO(read_member(f"{image_file(root, tar)}{MEMBER_SEP}{member}"))
        except (KeyError, OSError, tarfile.TarError):
            raise DataError(
                f"{image_file(root, tar)}: no readable member {member} (gallery path of "
                f"'{g.image_ids[row]}'). Pass the folder that holds the tar shards with `root`.",
                params=("root",),
            ) from None
    p = Path(g.paths[row])
    full = image_file(root, g.paths[row])
    if not full.exists() and p.exists():
        return p
    if not full.exists():
        what = f"gallery path of '{g.image_ids[row]}'" + (f", {p} under {root}" if full != p else "")
        raise DataError(
            f"{full}: image file not found ({what}). Pass the dataset root, the folder that holds {p}, with `root`.",
            params=("root",),
        )
    return full


def sheet_rows(
    nt: NegativesTable,
    ws: Workspace,
    split: str,
    query_ids: Sequence[str],
    root: Optional[Path] = None,
    max_negatives: int = 8,
) -> list[SheetRow]:
    """The data of a contact sheet: one SheetRow per query, negatives sorted by rank then Δ."""
    g, t = ws.load(split)
    qrow = {q: i for i, q in enumerate(t.query_ids.tolist())}
    import pyarrow as pa
    import pyarrow.compute as pc

    picked = nt.table.filter(pc.is_in(nt.table.column("query_id"), value_set=pa.array(list(query_ids), pa.string())))
    cols = picked.to_pydict()  # only the drawn queries' rows
    by_q: dict[str, list[int]] = {}
    for i, q in enumerate(cols["query_id"]):
        by_q.setdefault(q, []).append(i)
    root = Path(root) if root is not None else ws.image_root(split)
    out = []
    for q in query_ids:
        if q not in qrow:
            raise DataError(
                f"{t.path}: query id '{q}' is not in the triplets of split '{split}'. "
                f"Pass the split the table was mined on with `split`.",
                params=("split",),
            )
        qi = qrow[q]
        cat = t.categories[qi]
        ref_r, tgt_r = g.rows([t.ref_ids[qi], t.target_ids[qi]], [cat, cat])
        rows = sorted(by_q.get(q, []), key=lambda i: (cols["rank"][i] < 0, cols["rank"][i], -cols["delta"][i]))
        tgt_attrs = g.attributes[tgt_r]
        ts = f"{cols['target_score'][rows[0]]:.3f}" if rows else "-"
        tiles = [
            Tile(
                "reference",
                t.ref_ids[qi],
                g.categories[ref_r],
                g.attributes[ref_r],
                _image_path(g, ref_r, root),
                ["reference", t.ref_ids[qi], g.categories[ref_r] or "-"],
            ),
            Tile(
                "target",
                t.target_ids[qi],
                g.categories[tgt_r],
                tgt_attrs,
                _image_path(g, tgt_r, root),
                ["target", t.target_ids[qi], f"s(q,t) {ts}", g.categories[tgt_r] or "-"],
            ),
        ]
        tiles += [_negative_tile(g, cols, i, n, cat, tgt_attrs, root) for n, i in enumerate(rows[:max_negatives])]
        guards, scope = guard_counts(nt.meta, q)
        short = None
        if q in set((nt.meta.get("shortfall") or {}).get("query_ids") or ()):
            short = f"{len(rows)} of {nt.meta.get('k_mined', nt.meta.get('k'))} negatives"
        out.append(SheetRow(q, list(t.captions[qi]), tiles, guards, scope, short))
    return out


def _negative_tile(g, cols: dict, i: int, n: int, cat: str, tgt_attrs, root: Path) -> "Tile":
    """The tile of the ``n``-th drawn negative, table row ``i`` of the drawn rows ``cols``: its labels
    and its attributes gained (plus) and lost (minus) against the target's."""
    nr = int(g.rows([cols["neg_id"][i]], [cols["neg_category"][i] or cat])[0])
    plus, minus = attribute_diff(g.attributes[nr], tgt_attrs)
    same = "same cat" if cols["category_match"][i] else "other cat"
    rank = cols["rank"][i]
    lines = [
        f"#{n + 1} {cols['strategy'][i]}" + (f" r{rank}" if rank >= 0 else ""),
        cols["neg_id"][i],
        f"Δ {cols['delta'][i]:+.3f}  s {cols['score'][i]:.3f}",
        f"{g.categories[nr] or '-'} ({same})",
    ]
    return Tile(
        "negative", cols["neg_id"][i], g.categories[nr], g.attributes[nr], _image_path(g, nr, root), lines, plus, minus
    )


# ----------------------------------------------------------------------------------------------
# Drawing


def _short(a: str) -> str:
    return a.split(":", 1)[1] if a.startswith("tag:") else a


def pack_tokens(tokens: Sequence[str], width: int, max_lines: int) -> list[str]:
    """Greedy line packing of ``tokens``; what does not fit in ``max_lines`` becomes "(+n more)"."""
    lines, cur = [], ""
    for i, tok in enumerate(tokens):
        cand = f"{cur} {tok}".strip()
        if len(cand) <= width or not cur:
            cur = cand
            continue
        lines.append(cur)
        cur = tok
        if len(lines) == max_lines:
            rest = list(tokens[i:])
            last = lines[-1].split(" ")
            while len(last) > 1 and len(" ".join(last)) + len(f" (+{len(rest)} more)") > width + 4:
                rest.insert(0, last.pop())  # make room for the suffix
            lines[-1] = " ".join(last) + f" (+{len(rest)} more)"
            return lines
    return lines + [cur] if cur else lines


def diff_lines(tile: Tile, width: int = 24, max_lines: int = 2) -> list[tuple[str, str]]:
    if tile.role == "negative" and tile.attributes and not tile.plus and not tile.minus:
        return [("= the target's attributes", "#d97706")]  # a possible false negative
    out = []
    for sign, vals, color in (("+", tile.plus, "#b91c1c"), ("−", tile.minus, "#1d4ed8")):
        out.extend(
            (line, color) for line in pack_tokens([sign + clip(_short(v), width) for v in vals], width, max_lines)
        )
    return out


def _draw_card(ax, tile: Tile, target_attrs: set) -> None:
    """A text card: category and attributes (red: not on the target)."""
    ax.set_facecolor("#f8fafc")
    ax.text(0.06, 0.94, clip(tile.category or "-", 30), transform=ax.transAxes, fontsize=8, weight="bold", va="top")
    attrs = list(tile.attributes)
    shown = attrs if len(attrs) <= 11 else attrs[:10]  # 11 lines fit; else 10 + "more"
    for j, a in enumerate(shown):
        color = "#b91c1c" if tile.role == "negative" and a not in target_attrs else "#111827"
        ax.text(
            0.06,
            0.82 - j * 0.072,
            textwrap.shorten(clip(_short(a), 200), 30, placeholder="…"),
            transform=ax.transAxes,
            fontsize=6.5,
            va="top",
            color=color,
        )
    if len(attrs) > len(shown):
        ax.text(
            0.06,
            0.82 - len(shown) * 0.072,
            f"… +{len(attrs) - len(shown)} more",
            transform=ax.transAxes,
            fontsize=6.5,
            va="top",
            color="#6b7280",
        )
    if not attrs:
        ax.text(0.5, 0.5, "(no attributes)", transform=ax.transAxes, fontsize=7, ha="center", color="#6b7280")


def _draw_tile(ax, tile: Tile, target_attrs: set) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if tile.image is not None:
        from PIL import Image, ImageOps

        with Image.open(tile.image) as im:
            im = ImageOps.contain(im.convert("RGB"), (THUMB_PX, THUMB_PX))  # up or down, keeps aspect
            canvas = Image.new("RGB", (THUMB_PX, THUMB_PX), (255, 255, 255))  # letterbox, keep aspect
            canvas.paste(im, ((THUMB_PX - im.width) // 2, (THUMB_PX - im.height) // 2))
            ax.imshow(np.asarray(canvas), aspect="auto")
    else:
        _draw_card(ax, tile, target_attrs)
    for s in ax.spines.values():
        s.set_color(ROLE_COLORS[tile.role])
        s.set_linewidth(2.5)
    y = -0.03
    for j, line in enumerate(tile.lines):
        ax.text(
            0.5,
            y,
            clip(line),
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=7,
            weight="bold" if j == 0 else "normal",
            color=ROLE_COLORS[tile.role] if j == 0 else "#111827",
        )
        y -= 0.09
    for line, color in diff_lines(tile):
        ax.text(0.5, y, line, transform=ax.transAxes, ha="center", va="top", fontsize=6.5, color=color)
        y -= 0.08


def render_sheet(rows: Sequence[SheetRow], title: str = "", max_negatives: int = 8):
    """A matplotlib Figure (Agg) with one band per query: caption and guards, then the tiles."""
    from matplotlib.figure import Figure

    ncols = 2 + max(1, min(max_negatives, max((len(r.tiles) - 2 for r in rows), default=1)))
    title_h, head_h, label_h = 0.35, 0.45, 1.2  # inches
    tile = TILE_IN * 0.88
    band_h = head_h + tile + label_h
    W, H = ncols * TILE_IN + 0.1, title_h + band_h * max(len(rows), 1)
    fig = Figure(figsize=(W, H), dpi=100)
    fig.text(0.05 / W, 1 - 0.08 / H, title, fontsize=9, va="top", ha="left", color="#374151")
    for b, row in enumerate(rows):
        top = H - title_h - b * band_h  # inches from the bottom
        caption = " / ".join(f"“{c}”" for c in row.captions if c)
        fig.text(
            0.05 / W,
            (top - 0.02) / H,
            f"{clip(row.query_id)}: {clip(caption, 160)}",
            fontsize=8.5,
            weight="bold",
            va="top",
            ha="left",
        )
        scope = "this query" if row.guards_scope == "query" else "whole table"
        g = ", ".join(f"{k} {v}" for k, v in row.guards.items() if v) or "none recorded"
        note = f"short: {row.short} · " if row.short else ""
        fig.text(
            0.05 / W,
            (top - 0.22) / H,
            f"{note}guards removed ({scope}): {g}",
            fontsize=7,
            va="top",
            ha="left",
            color="#4b5563",
        )
        target_attrs = set(row.tiles[1].attributes)
        for j, t in enumerate(row.tiles[:ncols]):
            left = 0.05 + j * TILE_IN + (TILE_IN - tile) / 2
            ax = fig.add_axes([left / W, (top - head_h - tile) / H, tile / W, tile / H])
            _draw_tile(ax, t, target_attrs)
    return fig


def contact_sheet(
    neg_path: str | Path,
    work: str | Path,
    out: str | Path,
    query_ids: Sequence[str] = (),
    sample: Optional[int] = None,
    root: Optional[str | Path] = None,
    split: Optional[str] = None,
    max_negatives: int = 8,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """``cir-mine inspect``: draw the sheet and write ``out`` (PNG, atomically).

    Returns {"out": Path, "queries": [...], "size": (width_px, height_px), "images": bool,
    "short": [SheetRow of each drawn query that got fewer than k negatives]}.
    """
    from cir_mine.data.io import check_output, write_job

    check_sheet_size(len(query_ids or ()) or (sample or 0), max_negatives, "query_id" if query_ids else "sample")
    out = check_output(out, [neg_path], overwrite)
    with write_job(out.parent, f"cir-mine inspect -> {out.name}"):
        return _contact_sheet(neg_path, work, out, query_ids, sample, root, split, max_negatives, seed)


def _contact_sheet(neg_path, work, out: Path, query_ids, sample, root, split, max_negatives, seed) -> dict:
    from cir_mine.data.io import atomic_path

    ws = Workspace(work).require()
    nt = read_negatives(neg_path, ws)
    split = split or nt.meta.get("split") or "train"
    if root is not None and not Path(root).is_dir():
        raise DataError(
            f"{root}: image folder not found. Pass the folder the gallery paths are relative to with `root`.",
            params=("root",),
        )
    qs = pick_queries(nt, query_ids, sample, seed)
    rows = sheet_rows(nt, ws, split, qs, Path(root) if root is not None else None, max_negatives)
    fig = render_sheet(rows, f"{Path(neg_path).name}  ·  {ws.root}  ·  split {split}", max_negatives)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    w, h = fig.get_size_inches() * fig.dpi
    return {
        "out": out,
        "queries": qs,
        "size": (int(round(w)), int(round(h))),
        "images": any(t.image is not None for r in rows for t in r.tiles),
        "short": [r for r in rows if r.short],
    }
