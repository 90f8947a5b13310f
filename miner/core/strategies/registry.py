"""The strategy registry and the mix parser.

A strategy is a function ``fn(ctx, k, stream, params) -> Picks`` registered by name with
:func:`register`, together with its parameter dataclass. ``ctx`` is the batch context built by
:mod:`cir_mine.miner.core.mine` (guarded candidate matrices for a batch of b queries, see
:class:`cir_mine.miner.core.context.BatchContext`), ``k`` the number of negatives this strategy
contributes per query, ``stream`` the random stream of its mix part (parts draw independently) and
``params`` an instance of its parameter dataclass. Candidates already picked by an earlier part of a
mix are unavailable (``ctx.available``).

Adding a strategy is one module that defines a frozen parameter dataclass (a comment per field, an
optional ``validate()`` raising :class:`UsageError` that names the parameters) and decorates its
function with ``@register(...)``; the built-in modules are imported by the package.
"""

from __future__ import annotations

import math

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from cir_mine.data.errors import UsageError


@dataclass(frozen=True)
class NoParams:
    """Parameters of a strategy that takes none."""


@dataclass(frozen=True)
class Strategy:
    # fmt: off
    name: str                    # registry name, as in --strategy and mixes
    fn: Callable                 # fn(ctx, k, stream, params) -> Picks
    params: type = NoParams      # parameter dataclass (every field has a default)
    ranked: bool = False         # needs the query's FAISS ranking
    attributes: bool = False     # needs requested attributes
    hint: str = ""               # the knob to loosen on shortfall, named as MineConfig.of(name=...) (the CLI shows its flag)
    prepare: Optional[Callable] = None  # prepare(pool, queries, index, cfg, k) -> JSON-able state, once per run
    # fmt: on


REGISTRY: dict[str, Strategy] = {}


def param_owner() -> dict:
    """Parameter name -> the strategy whose dataclass defines it (names are unique across strategies)."""
    return {f.name: s.name for s in REGISTRY.values() for f in dataclasses.fields(s.params)}


def register(
    name: str,
    params: type = NoParams,
    *,
    ranked: bool = False,
    attributes: bool = False,
    hint: str = "",
    prepare: Optional[Callable] = None,
) -> Callable:
    """Decorator: register ``fn`` as strategy ``name`` with parameter dataclass ``params``."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"strategy {name}: params must be a dataclass, got {params!r}")
    taken = param_owner()
    for f in dataclasses.fields(params):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"strategy {name}: parameter {f.name} needs a default")
        if taken.get(f.name, name) != name:
            raise TypeError(f"strategy {name}: parameter {f.name} is already {taken[f.name]}'s")

    def wrap(fn: Callable) -> Callable:
        REGISTRY[name] = Strategy(name, fn, params, ranked, attributes, hint, prepare)
        return fn

    return wrap


def unregister(name: str) -> None:
    """Remove a strategy (for tests that register a toy one)."""
    REGISTRY.pop(name, None)


def default_params() -> dict:
    """Strategy name -> its parameter dataclass with every default."""
    return {name: s.params() for name, s in REGISTRY.items()}


def validate_params(params: dict) -> None:
    """Run each strategy's ``validate()`` (unknown strategy names are refused)."""
    for name, p in params.items():
        s = REGISTRY.get(name)
        if s is None:
            raise UsageError(f"parameters given for unknown strategy {name!r}: use one of {', '.join(REGISTRY)}.")
        if not isinstance(p, s.params):
            raise UsageError(f"parameters of {name} must be a {s.params.__name__}, got {type(p).__name__}.")
        check: Optional[Callable] = getattr(p, "validate", None)
        if check is not None:
            check()


# ------------------------------------------------------------------------------------------------
# Mixes


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """'midzone:0.6,category:0.3,random:0.1' (or one name) -> [(name, share)], shares summing to 1."""
    parts = []
    items = [s.strip() for s in str(spec).split(",")]
    if len(items) > 1 and not all(items):
        raise UsageError(f"empty entry in mix {spec!r}: use NAME:SHARE,NAME:SHARE, e.g. midzone:0.6,random:0.4.")
    for item in [s for s in items if s]:
        name, sep, share = item.partition(":")
        name = name.strip()
        if name not in REGISTRY:
            raise UsageError(f"unknown strategy {name!r} in {spec!r}: use one of {', '.join(REGISTRY)}.")
        try:
            w = float(share) if sep else 1.0
        except ValueError:
            raise UsageError(f"bad share {share!r} for {name} in {spec!r}: use NAME:SHARE, e.g. midzone:0.6.") from None
        if not w > 0:
            raise UsageError(f"share of {name} in {spec!r} must be positive.")
        if not math.isfinite(w):
            raise UsageError(f"share of {name} in {spec!r} must be a finite number.")
        if any(n == name for n, _ in parts):
            raise UsageError(f"strategy {name} appears twice in {spec!r}.")
        parts.append((name, w))
    if not parts:
        raise UsageError(f"empty mix {spec!r}: use e.g. midzone:0.6,category:0.3,random:0.1.")
    total = sum(w for _, w in parts)
    if abs(total - 1.0) < 1e-9:
        return parts
    return [(n, w / total) for n, w in parts]


def check_share(name: str, value: float) -> None:
    """A parameter that is a share of k: in [0, 1], else a UsageError naming it."""
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"{name} {value}: must be in [0, 1].", params=(name,))


def split_k(k: int, shares: list[float]) -> list[int]:
    """Split k by shares: floors, then the remainder to the largest fractions (ties: earlier part)."""
    raw = [k * s for s in shares]
    base = [int(np.floor(r + 1e-9)) for r in raw]
    rest = k - sum(base)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return base
