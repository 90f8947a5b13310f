"""The search back-end mining opens under the one device rule.

``mine_negatives(ws, split, cfg, index=device_search)`` (what ``cir-mine negatives`` and the
re-mining hook do): exact search (``cfg.index`` 'flat') runs on the GPU through
:class:`~cir_mine.miner.accel.search.TorchSearch` when the rule picks one; everything else stays
the core's own (exact search on the CPU; FAISS indexes, which go to the GPU when the installed
FAISS has GPU support).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from cir_mine.miner.accel.device import choose_device
from cir_mine.miner.accel.search import TorchSearch

EXACT_SPECS = ("flat", "Flat")


def device_search(xb: np.ndarray, cfg) -> Optional[TorchSearch]:
    """The device back-end for a :class:`~cir_mine.miner.core.mine.MineConfig` over the gallery
    ``xb`` (float32[n, d]): a TorchSearch on the GPU for exact search when ``cfg.device`` resolves
    to one (:func:`~cir_mine.miner.accel.device.choose_device`), else None (the core opens its own).
    ``cfg.device`` is checked either way, so 'cuda' without a GPU is refused before any work."""
    device = choose_device(cfg.device)
    if device == "cpu" or cfg.index not in EXACT_SPECS:
        return None
    return TorchSearch(xb, device=device)
