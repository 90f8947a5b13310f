"""The CPU cores this process may use: the one count every thread pool of cir-mine sizes itself by."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
