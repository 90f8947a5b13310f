"""Which allocator Arrow's large buffers come from: the one memory rule.

pyarrow's default pool is mimalloc. On a VM whose host backs memory lazily (this project's
machines), mimalloc faults its fresh memory in as huge pages, fast when the host has them at hand
and slow when it must find them, and hands memory back between large reads and gathers, so the
next one faults it in again: the read stage of `cir-mine negatives` on a 100k x 256 workspace took
1.06 to 1.48 s through mimalloc against 0.78 to 0.81 s through jemalloc (docs/benchmarks.md,
"Reading a workspace"). jemalloc keeps freed pages for a while (its decay).

:func:`fast_pool` is the pool cir-mine's own large Arrow allocations name (gathers of table
columns); :func:`prefer_fast_pool` makes it the process's default, so that the Parquet reads
(which take no pool) use it too. The command line calls it at start; a program using the Python
API may call it too (it changes pyarrow's default for the whole process, which is why the
library never calls it by itself). ``ARROW_DEFAULT_MEMORY_POOL`` set in the environment is the
user's choice, and is kept.
"""

from __future__ import annotations

import os

POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"  # pyarrow's own switch: when set, the process keeps its choice


def fast_pool():
    """jemalloc's pool where this pyarrow has it (Linux and macOS wheels), else the system allocator's."""
    import pyarrow as pa

    try:
        return pa.jemalloc_memory_pool()
    except (NotImplementedError, pa.ArrowNotImplementedError):
        return pa.system_memory_pool()


def prefer_fast_pool() -> str:
    """Make :func:`fast_pool` pyarrow's default memory pool unless ``ARROW_DEFAULT_MEMORY_POOL`` is
    set; -> the default pool's backend name."""
    import pyarrow as pa

    if not os.environ.get(POOL_ENV):
        pa.set_memory_pool(fast_pool())
    return pa.default_memory_pool().backend_name
