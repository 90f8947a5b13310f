"""Run checkpoints: one ``RUN/ckpt.pt`` rewritten atomically after every epoch.

A checkpoint is a ``torch.save`` dict (see docs/formats.md)::

    {"format": "cir-train-ckpt", "version": 1, "epoch": e (epochs done), "model_config": {...},
     "train_config": {...}, "model": state_dict, "optimizer": state_dict, "round": r,
     "negatives": path of the table in use, "history": [per-epoch records], "versions": {...}}

Written to a temp file in RUN and ``os.replace``d, so a kill mid-write leaves the previous
checkpoint intact. ``CRASH_AFTER_SAVE`` lets a test kill a run right after epoch N is saved.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from data.errors import DataError
from data.io import atomic_path
from data.workspace import library_versions

FORMAT = "cir-train-ckpt"
VERSION = 1
NAME = "ckpt.pt"


def save_checkpoint(run_dir: str | Path, state: dict) -> Path:
    """Write ``state`` (plus format tags and versions) to RUN/ckpt.pt atomically."""
    path = Path(run_dir) / NAME
    payload = {"format": FORMAT, "version": VERSION, "versions": library_versions(), **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint (a RUN directory or the .pt file); DataError when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / NAME
    if not path.exists():
        raise DataError(f"{path}: checkpoint not found. Train a run with `cir-train --out RUN` first.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt file
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path}: not a cir-train checkpoint.")
    if state.get("version") != VERSION:
        raise DataError(f"{path}: checkpoint version {state.get('version')} is not {VERSION}; retrain.")
    return state


def crash_after_epoch() -> Optional[int]:
    """Test hook: ``CIR_TRAIN_CRASH_AFTER_EPOCH=N`` raises after epoch N's checkpoint is saved."""
    v = os.environ.get("CIR_TRAIN_CRASH_AFTER_EPOCH")
    return int(v) if v else None
