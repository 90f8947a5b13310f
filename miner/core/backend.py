"""Step 2 of a mining run: the search back-end it searches through, opened (and tuned) once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from cir_mine.data.workspace import Workspace, file_digest
from cir_mine.miner.core.config import MineConfig
from cir_mine.miner.core.prepare import Prepared
from cir_mine.miner.core.schedule import reserve_depth
from cir_mine.miner.core.search.backends import ExactSearch, Reranked, check_backend
from cir_mine.miner.core.search.build import build_index, factory_string, sample_rows
from cir_mine.miner.core.search.params import (
    current_params,
    default_overfetch,
    index_kind,
)
from cir_mine.miner.core.search.persist import check_index, index_meta, load_index
from cir_mine.miner.core.search.tuning import Tuning, by_lists, list_positions, tune, tune_deep


def open_search(prep: Prepared, ws: Workspace, split: str, cfg: MineConfig, index=None) -> tuple:
    """Step 2 (search back-end): -> (back-end, footer record). ``index``: a back-end (``.search(xq, k)``
    with ``describe()``) used as given, a bare FAISS index (re-ranked exactly), or a factory
    ``index(xb, cfg) -> back-end | None`` (``cir_mine.miner.accel.device_search``: the device
    rule's); otherwise (or when the factory returns None) ``cfg.index`` names one. Approximate
    back-ends opened here get ``cfg``'s search parameters, or are tuned to ``cfg.target_recall`` on
    a seeded sample of the composed queries."""
    xb = prep.pool.xb
    n, d = xb.shape
    maker = factory_of(index)
    if maker is not None:
        made = maker(xb, cfg)  # a factory from above the core (the device rule's back-end)
        if made is not None:
            check_backend(made, n, d, "the device back-end")
            return made, {**made.describe(), "source": "built"}
        index = None
    if index is not None:
        if hasattr(index, "describe"):
            check_backend(index, n, d, "the given back-end")
            return index, {**index.describe(), "source": "given"}
        check_index(
            index, prep.g, "the given index", ws.gallery_path(split), fix="Pass an index built from this gallery"
        )
        backend = Reranked(
            index,
            xb,
            cfg.overfetch or 1.0,
            {"index": "given", "factory": type(index).__name__, "params": current_params(index)},
        )
        backend.exact = index_kind(index) == "flat"
        if cfg.fixed_params():
            backend.set_params(cfg.fixed_params())
        return backend, {**backend.describe(), "source": "given"}
    spec = cfg.index
    if spec == "flat" or spec == "Flat":
        backend = ExactSearch(xb, device=cfg.device, fp16=cfg.fp16)
        return backend, {**backend.describe(), "source": "built"}
    if spec == "workspace":
        path = ws.index_path(split)
        meta = index_meta(path)
        # the file's SHA-256 on a thread of its own, beside the read and the gallery's check (hashlib
        # releases the GIL): at 1M x 256 each hashes about 1 GB
        with ThreadPoolExecutor(1, thread_name_prefix="cir-mine-digest") as pool:
            digest = pool.submit(file_digest, path)
            raw = load_index(path, "cpu" if "HNSW" in str(meta.get("factory", "")) else cfg.device)
            check_index(
                raw,
                prep.g,
                path,
                ws.gallery_path(split),
                meta.get("gallery_hash"),
                f"Rebuild it with `cir-mine index work={ws.root} split={split}`",
                ("work", "split"),
                meta.get("gallery_file"),
            )
            fingerprint = digest.result()
        factory = meta.get("factory") or type(raw).__name__
        info = {"index": "workspace", "factory": factory, "file": path.name, "fingerprint": fingerprint}
    else:
        raw = build_index(xb, spec, cfg.device, cfg.fp16, cfg.seed)
        factory = factory_string(spec, n, d)
        info = {"index": spec, "factory": factory}
    if index_kind(raw) == "flat":
        backend = Reranked(raw, xb, 1.0, {**info, "params": {}})
        backend.exact = True
        return backend, {**backend.describe(), "source": "built"}
    backend = Reranked(raw, xb, cfg.overfetch or default_overfetch(factory), {**info, "params": current_params(raw)})
    rec = {"source": "built" if spec != "workspace" else "workspace"}
    if cfg.fixed_params():
        backend.set_params(cfg.fixed_params())
    elif cfg.target_recall is not None and prep.need_ranked:
        reference = exact_reference(xb, cfg, maker)
        rec["tuning"] = tune_backend(prep, cfg, backend, reference).to_dict()
        if cfg.check_recall:  # the check searches the same reference: its gallery copy and race are made
            backend.reference = reference
    return backend, {**backend.describe(), **rec}


def exact_reference(xb, cfg: MineConfig, index=None):
    """The exact search a recall reference (tuning, ``check_recall``) runs on: the one the device
    rule's factory ``index`` makes for exact search of this gallery (on the CPU its bfloat16 scan
    races the core's kernels, as exact mining does), else the core's own ExactSearch. Exact search
    returns the same rows on any kernel, so this choice changes the time only."""
    maker = factory_of(index)
    made = maker(xb, cfg.replace(index="flat")) if maker is not None else None
    return made if made is not None else ExactSearch(xb, blocked=True)


def factory_of(index):
    """``index`` when it is a factory of back-ends (``index(xb, cfg) -> back-end | None``, the
    device rule's), else None (None, a back-end or a FAISS index)."""
    return index if index is not None and not hasattr(index, "search") else None


def tune_backend(prep: Prepared, cfg: MineConfig, backend, exact) -> "Tuning":
    """Tune an approximate back-end to ``cfg.target_recall`` on a seeded sample of the composed
    queries: at the depth every batch is searched at (the reserve short queries are mined from, so
    the negatives of queries whose target ranks deep are found as reliably), then, when deepening
    can search further and a deeper search costs about the same (full vectors: the later batches
    may be searched that deep at once), at the deepest depth (``max_candidates``) too. Other
    back-ends (compressed codes, HNSW) keep the tuned value-to-depth ratio for deeper searches.
    ``exact``: the reference's exact search (:func:`exact_reference`)."""
    depth = reserve_depth(prep, cfg, backend)
    deepest = min(len(prep.g), cfg.max_candidates) if cfg.max_candidates else depth
    sample = sample_rows(prep.m, cfg.tune_queries, cfg.seed, 1)
    xq = prep.qs.emb[sample]
    _, exact_I = exact.search(xq, max(depth, deepest))
    pos = list_positions(backend, xq, exact_I) if by_lists(backend) else None  # every exact row's, once
    tuning = tune(backend, exact_I[:, :depth], xq, depth, cfg.target_recall, positions=pos)
    if deepest > depth and getattr(backend, "cheap_depth", False):
        tuning.deep = tune_deep(backend, exact_I, xq, deepest, cfg.target_recall, positions=pos)
    return tuning
