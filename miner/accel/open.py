"""The search back-end mining opens under the one device rule.

``mine_negatives(ws, split, cfg, index=device_search)`` (what ``cir-mine negatives`` and the
re-mining hook do): exact search (``cfg.index`` 'flat') runs on the GPU through
:class:`~cir_mine.miner.accel.search.TorchSearch` when the rule picks one, and on the CPU races
torch's bfloat16 scan (:class:`~cir_mine.miner.accel.bf16.Bf16Scan`) against the core's kernels;
everything else stays the core's own (FAISS indexes, which go to the GPU when the installed FAISS
has GPU support).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from cir_mine.miner.accel.bf16 import Bf16Scan
from cir_mine.miner.accel.device import choose_device
from cir_mine.miner.accel.search import TorchSearch
from cir_mine.miner.core.search.backends import ExactSearch

EXACT_SPECS = ("flat", "Flat")


def device_search(xb: np.ndarray, cfg) -> Optional[object]:
    """The device back-end for a :class:`~cir_mine.miner.core.mine.MineConfig` over the gallery
    ``xb`` (float32[n, d]) for exact search (``cfg.index`` 'flat'): a TorchSearch on the GPU when
    ``cfg.device`` resolves to one (:func:`~cir_mine.miner.accel.device.choose_device`); on the CPU,
    for a gallery in memory, the core's ExactSearch with the bfloat16 scan in its kernel race
    (:class:`~cir_mine.miner.accel.bf16.Bf16Scan`); else None (the core opens its own). ``cfg.device``
    is checked either way, so 'cuda' without a GPU is refused before any work."""
    device = choose_device(cfg.device)
    if cfg.index not in EXACT_SPECS:
        return None
    if device != "cpu":
        return TorchSearch(xb, device=device)
    if isinstance(xb, np.memmap):  # blocked: its pages stay released, no copy is held
        return None
    return ExactSearch(xb, device=cfg.device, fp16=cfg.fp16, scans={"bf16": Bf16Scan(xb)})
