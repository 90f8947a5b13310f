"""Option values checked once, for every entry point (CLI, Python API, resumed runs).

:func:`check_numbers` refuses non-finite floats (NaN, inf, also inside tuples) and seeds outside
0..2**64-1 in any config dataclass; each config's ``validate`` calls it first, then checks its own
ranges with :func:`check_range`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

from cir_mine.data.errors import UsageError

SEED_MAX = 2**64 - 1


def check_finite(name: str, value) -> None:
    """``value`` (a number, or a tuple/list of numbers) must be finite."""
    values = value if isinstance(value, (tuple, list)) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            shown = ",".join(str(x) for x in values) if len(values) > 1 else str(v)
            raise UsageError(f"`{name}` {shown}: must be a finite number.", params=(name,))


def check_seed(name: str, value: int) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= SEED_MAX:
        raise UsageError(f"`{name}` {value}: must be in 0..{SEED_MAX} (a 64-bit unsigned seed).", params=(name,))


_KINDS = {"int": "int", "Optional[int]": "int", "float": "float", "Optional[float]": "float"}


def check_type(name: str, value, annotation) -> None:
    """A field annotated ``int`` holds an int (never a bool or a string), one annotated ``float`` a number
    (an int or a float, never a bool or a string); ``Optional[...]`` also takes None."""
    kind = _KINDS.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))
    if kind is None or (value is None and str(annotation).startswith("Optional")):
        return
    if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        raise UsageError(f"{name} {value!r}: must be an integer.", params=(name,))
    if kind == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise UsageError(f"{name} {value!r}: must be a number.", params=(name,))


def check_numbers(cfg, skip: Iterable[str] = ()) -> None:
    """Every int/float field of the dataclass ``cfg`` of its type (:func:`check_type`), every float
    field finite, every ``seed``/``*_seed`` field a 64-bit seed."""
    skip = set(skip)
    if not isinstance(cfg, dict):
        for f in dataclasses.fields(cfg):
            if f.name not in skip and not f.name.startswith("_"):
                check_type(f.name, getattr(cfg, f.name), f.type)
    items = cfg.items() if isinstance(cfg, dict) else ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg))
    for name, v in items:
        if name in skip or str(name).startswith("_"):
            continue
        if dataclasses.is_dataclass(v) and not isinstance(v, type) or isinstance(v, dict):
            check_numbers(v, skip)  # nested configs (guards, per-strategy parameters)
            continue
        check_finite(name, v)
        if name == "seed" or str(name).endswith("_seed"):
            check_seed(name, v)


def check_range(
    name: str,
    value: float,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """``lo <= value <= hi`` (open ends with ``lo_open``/``hi_open``); the message states the interval."""
    check_finite(name, value)
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        interval = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"
        raise UsageError(f"`{name}` {value:g}: must be in {interval}.", params=(name,))
