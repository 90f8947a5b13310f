"""What cir-mine's commands say about their results, as text: one function per result (a workspace's
summary, a dataset's, what a command wrote). They return lines joined by newlines and print nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _categories(categories: Sequence) -> str:
    return ", ".join(c or "-" for c in categories)


def workspace_lines(info: dict) -> str:
    """A workspace's summary (:meth:`cir_mine.data.workspace.Workspace.summary`): manifest, encoder, splits."""
    m = info["manifest"]
    lines = [
        f"workspace {info['root']}  (manifest {'derived' if m.get('derived') else 'manifest.json'}, hash {info['hash']})",
        f"encoder: {m.get('encoder', {}).get('name')}  dim: {m.get('dim')}  source: {m.get('source')}",
    ]
    lines += [
        f"  {split}: {s['images']} images, {s['triplets']} triplets, categories: {_categories(s['categories'])}"
        "  [valid]"
        for split, s in info["splits"].items()
    ]
    return "\n".join(lines)


def dataset_line(dataset: str, split: str, s: dict) -> str:
    """A dataset's annotations (:func:`cir_mine.data.adapters.dataset_summary`)."""
    return (
        f"{dataset} {split}: {s['images']} images ({s['image_files']} with image files, "
        f"{s['with_attributes']} with attributes), {s['queries']} queries, categories: "
        f"{_categories(s['categories'])}"
    )


def positives_line(r) -> str:
    """The generated triplets (:class:`cir_mine.miner.positives.generate.PositivesResult`)."""
    return (
        f"wrote {r.out}: {r.n_pairs} generated triplets from {r.n_candidates_images} gallery images "
        f"(changed groups: {r.meta['changed_groups']})"
    )


def attribute_lines(texts: Sequence[str], requests: Sequence) -> str:
    """Each caption and the attributes it asks for (+ wanted, - ruled out, ~ comparative)."""
    return "\n".join(f"{text}\t{' '.join(req.as_strings()) or '(none)'}" for text, req in zip(texts, requests))


def embed_line(work: Path, split: str, m: dict) -> str:
    """What an embedding run wrote, from its manifest."""
    info = m["embed"][split]
    skipped = info["skipped_images"]["count"]
    return (
        f"wrote {work}: {info['images'] - skipped} images, "
        f"{info['queries'] - info['dropped_triplets']} triplets (d={m['dim']}, {m['encoder']['name']}); "
        f"skipped {skipped} unreadable image(s), dropped {info['dropped_triplets']} triplet(s)"
    )


def index_lines(work: Path, split: str, meta: dict, npy: bool) -> str:
    """What an index build wrote: the memory-mapped embeddings (with ``npy``) and the index."""
    lines = [f"wrote {work}/gallery.{split}.npy: the gallery embeddings, memory-mapped by mining"] if npy else []
    lines.append(
        f"wrote {work}/index.{split}.faiss: {meta.get('factory')} over {meta.get('gallery_rows')} images "
        f"({'GPU' if meta.get('gpu') else 'CPU'} build)"
    )
    return "\n".join(lines)


def export_line(r, fmt: str, caption_files: bool) -> str:
    """What an export wrote (:func:`cir_mine.miner.core.export.export_negatives`); ``caption_files``: the
    CLIP4Cir caption files of a jsonl export into a dataset root."""
    what = f"{len(r.files)} caption file(s) in {r.out}" if caption_files else str(r.out)
    if fmt == "ntuple":
        left = f" ({r.left_out} with fewer than {r.k} negatives left out)" if r.left_out else ""
        return f"wrote {what}: {r.queries} queries with {r.k} negatives each{left}"
    return f"wrote {what}: {r.queries} queries, up to {r.k} negatives each"


def sheet_lines(r: dict) -> str:
    """A contact sheet (:func:`cir_mine.miner.inspection.contact_sheet.contact_sheet`), then each drawn
    query that got fewer negatives than asked, with what the guards removed."""
    kind = "thumbnails" if r["images"] else "attribute cards (no image paths)"
    lines = [f"wrote {r['out']}: {len(r['queries'])} queries, {r['size'][0]}x{r['size'][1]} px, {kind}"]
    for row in r["short"]:
        scope = "" if row.guards_scope == "query" else " (whole table)"
        guards = ", ".join(f"{g} {n:,}" for g, n in row.guards.items() if n) or "none recorded"
        lines.append(f"{row.query_id}: short, {row.short}; guards removed{scope}: {guards}")
    return "\n".join(lines)


def report_line(out: Path, r) -> str:
    """An HTML report (:func:`cir_mine.miner.inspection.report.write_report`): its plots and size."""
    return f"wrote {out}: {len(r.plots)} plots ({', '.join(r.plots)}), {len(r.html) // 1024} KiB"
