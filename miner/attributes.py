"""Attributes: requested-attribute extraction from captions, and attribute overlap.

STUB (foundation): a minimal rule-based extractor over the synthetic world's vocabulary. The
negatives issue's attribute work replaces the internals (editable vocabulary file, FashionIQ
vocabulary, negation, comparatives) behind the same API:

- ``extract(text) -> Requested``: what a caption asks for.
- ``group_values(attrs)``, ``attr_overlap(a, b)``: on ``group:value`` lists.
- ``requested_status(attrs, req) -> {group: True | False | None}``: whether an image with
  ``attrs`` satisfies each requested group (None: the image carries no value of that group).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

# group -> value -> phrases that name it (lower case)
_VOCAB: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {v: (v,) for v in ("black", "white", "red", "blue", "green", "yellow", "pink", "purple", "grey", "beige")},
    "sleeve": {"sleeveless": ("sleeveless", "no sleeves"), "short": ("short sleeves",),
               "three-quarter": ("three-quarter sleeves",), "long": ("long sleeves",)},
    "pattern": {"solid": ("solid", "no pattern"), **{v: (v,) for v in ("striped", "floral", "plaid", "polka-dot", "graphic")}},
    "length": {v: (v,) for v in ("mini", "knee-length", "midi", "maxi")},
    "neckline": {v: (v,) for v in ("v-neck", "crew-neck", "scoop-neck", "turtleneck", "off-shoulder")},
}
_COMPARATIVES = {"longer sleeves": ("sleeve", "more"), "shorter sleeves": ("sleeve", "less"),
                 "longer": ("length", "more"), "shorter": ("length", "less")}


@dataclass(frozen=True)
class Requested:
    positive: dict = field(default_factory=dict)     # group -> frozenset of values asked for
    negative: dict = field(default_factory=dict)     # group -> frozenset of values ruled out
    comparative: dict = field(default_factory=dict)  # group -> "more" | "less"

    @property
    def groups(self) -> frozenset:
        return frozenset(self.positive) | frozenset(self.negative) | frozenset(self.comparative)

    def __bool__(self) -> bool:
        return bool(self.groups)


def _has(text: str, phrase: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])", text) is not None


def extract(text: str) -> Requested:
    """Requested attributes of one caption (or captions joined with " and ")."""
    t = text.lower()
    pos: dict[str, set] = {}
    comp: dict[str, str] = {}
    for phrase, (g, d) in _COMPARATIVES.items():
        if _has(t, phrase):
            comp.setdefault(g, d)
            t = t.replace(phrase, " ")
    for g, values in _VOCAB.items():
        for v, phrases in values.items():
            if any(_has(t, p) for p in phrases):
                pos.setdefault(g, set()).add(v)
    return Requested({g: frozenset(v) for g, v in pos.items()}, {}, comp)


def extract_many(texts: Iterable[str]) -> list[Requested]:
    return [extract(t) for t in texts]


def group_values(attrs: Iterable[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for a in attrs:
        g, sep, v = a.partition(":")
        if not sep:
            g, v = "tag", a
        out.setdefault(g, set()).add(v)
    return out


def attr_overlap(a: Iterable[str], b: Iterable[str]) -> float:
    """Jaccard overlap of two ``group:value`` lists (0 when both are empty)."""
    sa, sb = set(a), set(b)
    union = sa | sb
    return len(sa & sb) / len(union) if union else 0.0


def requested_status(attrs: Iterable[str], req: Requested) -> dict[str, Optional[bool]]:
    """Per requested group: True (satisfied), False (contradicted), None (unknown)."""
    have = group_values(attrs)
    out: dict[str, Optional[bool]] = {}
    for g in req.groups:
        vals = have.get(g)
        if not vals:
            out[g] = None
            continue
        ok = True
        if g in req.positive:
            ok = bool(vals & req.positive[g])
        if g in req.negative and vals & req.negative[g]:
            ok = False
        out[g] = ok if g not in req.comparative or g in req.positive else None
    return out
