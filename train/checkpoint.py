"""Run checkpoints: one ``RUN/ckpt.pt`` rewritten atomically after every epoch.

A checkpoint is a ``torch.save`` dict (see docs/formats.md)::

    {"format": "cir-train-ckpt", "version": 1, "epoch": e (epochs done), "model_config": {...},
     "train_config": {...}, "model": state_dict, "optimizer": state_dict, "round": r,
     "negatives": path of the table in use, "history": [per-epoch records], "versions": {...}}

Written to a temp file in RUN and ``os.replace``d, so a kill mid-write leaves the previous
checkpoint intact; the training loop passes the crash point ``epoch-saved`` (cir_mine.data.crash) after
each save. A run's model is also a source of query embeddings for mining (:class:`CheckpointQueries`,
:func:`query_source`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Optional

import numpy as np

import torch

from cir_mine.data.errors import DataError, UsageError
from cir_mine.data.io import atomic_path
from cir_mine.data.workspace import library_versions
from cir_mine.miner.negatives import QueryFile

FORMAT = "cir-train-ckpt"
VERSION = 1
NAME = "ckpt.pt"


def save_checkpoint(run_dir: str | Path, state: dict) -> Path:
    """Write ``state`` (plus format tags and versions) to RUN/ckpt.pt atomically."""
    path = Path(run_dir) / NAME
    payload = {"format": FORMAT, "version": VERSION, "versions": library_versions(), **state}
    buf = io.BytesIO()  # torch's own file writer reports a full disk as an opaque RuntimeError
    torch.save(payload, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getbuffer())
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint (a RUN directory or the .pt file); DataError when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / NAME
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found. Train a run with `cir-train out=RUN` first.", params=("out",))
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt file
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path}: not a cir-train checkpoint.")
    if state.get("version") != VERSION:
        raise DataError(f"{path}: checkpoint version {state.get('version')} is not {VERSION}; retrain.")
    return state


def load_query_encoder(ckpt_path: str | Path) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A trained run's query encoder: f(ref_emb float32[m,d], text_emb float32[m,d]) -> float32[m,d].

    The hook ``cir-mine negatives --checkpoint`` uses (through cli.py; the miner never imports train).
    """
    from cir_mine.train.model import ModelConfig, build_model, encode_queries as encode

    state = load_checkpoint(ckpt_path)
    model = build_model(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    model.eval()
    return lambda ref_emb, text_emb: encode(model, ref_emb, text_emb)


def encode_queries(ckpt_path: str | Path, work: str | Path, split: str) -> np.ndarray:
    """Every query of ``work``/``split`` embedded by a trained run -> float32[m, d], unit rows."""
    from cir_mine.data.workspace import Workspace

    g, t = Workspace(work).require().load(split)
    state = load_checkpoint(ckpt_path)
    model_dim = state["model_config"]["dim"]
    if model_dim != g.dim:
        raise DataError(
            f"{ckpt_path}: the model takes d={model_dim} but {work} has d={g.dim}. "
            f"Use a checkpoint trained on this workspace's encoder."
        )
    trained_on, here = state.get("workspace_hash"), Workspace(work).manifest_hash()
    if trained_on and trained_on != here:
        raise DataError(
            f"{ckpt_path}: trained on another workspace (manifest hash {trained_on}, {work} has "
            f"{here}). Use a checkpoint trained on this workspace."
        )
    ref = g.embeddings[g.rows(t.ref_ids.tolist(), t.categories.tolist(), what="reference")]
    return load_query_encoder(ckpt_path)(ref, t.text_embeddings)


class CheckpointQueries:
    """The query source of a trained run (``cir-mine negatives --checkpoint``): every query of the
    split embedded by the model of ``path`` (a query source of cir_mine.miner.negatives.mine_file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reads = (self.path,)

    def embeddings(self, ws, split: str, loaded=None) -> np.ndarray:
        return encode_queries(self.path, ws.root, split)


def query_source(checkpoint: Optional[Path] = None, query_emb: Optional[Path] = None, query_ids: Optional[Path] = None):
    """Where mining's query embeddings come from (a query source of cir_mine.miner.negatives.mine_file):
    the model of a run's ``checkpoint``, your ``query_emb`` .npy (its rows named by ``query_ids``, or
    in the triplets' order), or neither (None: zero-shot)."""
    if checkpoint is not None and query_emb is not None:
        raise UsageError("give `checkpoint` or `query_emb`, not both.", params=("checkpoint", "query_emb"))
    if query_ids is not None and query_emb is None:
        raise UsageError(
            "`query_ids` names the rows of `query_emb`; pass `query_emb` too.", params=("query_ids", "query_emb")
        )
    if checkpoint is not None:
        return CheckpointQueries(checkpoint)
    return QueryFile(query_emb, query_ids) if query_emb is not None else None
