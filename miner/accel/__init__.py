"""Accelerated paths through torch: the one device rule (:mod:`.device`), exact search on a torch
device (:mod:`.search`), the bfloat16 candidate scan for exact search on the CPU (:mod:`.bf16`), and
the back-end mining opens on them (:func:`device_search`).

A layer above the mining core (which imports no torch): the core asks for a device back-end through
the factory it is given (``mine_negatives(..., index=device_search)``)."""

from cir_mine.miner.accel.device import choose_device
from cir_mine.miner.accel.open import device_search
from cir_mine.miner.accel.search import TorchSearch

__all__ = ["TorchSearch", "choose_device", "device_search"]
