"""Which allocator Arrow's large buffers come from: the one memory rule.

pyarrow's default pool is mimalloc. On a VM whose host takes freed pages back (this project's
machines), mimalloc hands the memory of one large read or gather back to the OS and faults it in
again at the next, costing system time on every fresh page: reading a 100k x 256 gallery took
0.5 to 1.3 s through mimalloc against 0.24 to 0.35 s through jemalloc (docs/benchmarks.md,
"Reading a workspace"). jemalloc keeps freed pages for a while (its decay), as glibc's allocator
does for small blocks.

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
