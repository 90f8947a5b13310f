"""The one device rule, for embedding and search.

``device`` is 'auto' | 'cpu' | 'cuda' (or 'cuda:N'). :func:`choose_device` is the only place that
decides what it means: 'cpu' never uses a GPU; 'cuda' needs torch to see a CUDA device (a
:class:`~cir_mine.data.errors.UsageError` naming ``device`` otherwise); 'auto' is 'cuda' when torch
sees one, else 'cpu'. The encoder runs on the device it returns, and exact search runs there
through :class:`~cir_mine.miner.accel.search.TorchSearch` (:func:`device_search`). FAISS GPU indexes
(IVF, a workspace's saved index) stay FAISS's own option: they go to the GPU when the installed
FAISS has GPU support (``cir_mine.miner.core.search.build.use_gpu``).
"""

from __future__ import annotations

import logging

from cir_mine.data.errors import UsageError
from cir_mine.miner.core.search.build import check_device

log = logging.getLogger(__name__)

_logged: set = set()


def choose_device(device: str = "auto") -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> the torch device string to run on ('cpu', 'cuda' or
    'cuda:N'). The choice is logged once per value."""
    import torch

    check_device(device)
    if device == "cpu":
        return "cpu"
    seen = torch.cuda.is_available()
    if device == "auto":
        chosen = "cuda" if seen else "cpu"
    elif not seen:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UsageError(
            f"device {device}: torch {torch.__version__} ({build}) sees no GPU. "
            f"Use device auto or cpu, or run on a machine with a GPU.",
            params=("device",),
        )
    else:
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"device {device}: torch sees {torch.cuda.device_count()} GPU(s). Use device cuda or a lower index.",
                params=("device",),
            )
        chosen = device
    if (device, chosen) not in _logged:
        _logged.add((device, chosen))
        log.info(
            "device %s -> %s%s", device, chosen, f" ({torch.cuda.get_device_name(chosen)})" if chosen != "cpu" else ""
        )
    return chosen
