"""Attributes: requested-attribute extraction from captions, and attribute overlap.

A rule-based extractor over an editable vocabulary file (``miner/core/vocabulary.json`` by
default, another one through ``Vocabulary.load(path)`` / ``--vocabulary FILE``):

- ``extract(text) -> Requested``: what a caption asks for: ``positive`` values ("is red"),
  ``negative`` values ("not striped", "no collar", "less red") and ``comparative`` directions on
  ordinal groups ("darker", "longer", "more casual", "tighter").
- ``group_values(attrs)``, ``attr_overlap(a, b)``: on ``group:value`` lists.
- ``requested_status(attrs, req) -> {group: True | False | None}``: whether an image with gallery
  attributes ``attrs`` satisfies each requested group. Gallery attributes are mapped onto the
  vocabulary's values through each value's ``gallery`` list (``part:sleeveless`` ->
  ``sleeve:sleeveless``; the synthetic world's ``sleeve:short`` maps to itself), so the same request
  can be checked on synthetic ground truth and on FashionIQ tags. None: the image carries no
  attribute of that group (the gallery cannot tell).

Matching: the caption is lower-cased, hyphens and punctuation become spaces, and the longest
vocabulary phrase wins at each position (so "longer sleeves" is a sleeve comparative, not a length
one, and "no pattern" is the phrase for ``pattern:solid``). A negator ("no", "not", "without",
"instead of", ...) or "more"/"less" applies to the next phrase, with filler words ("a", "any",
"much", ...) in between. Phrases that rule a value out (``not``: "has sleeves" rules out
sleeveless) flip under negation ("without a pattern" -> solid).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from cir_mine.data.errors import DataError
from cir_mine.data.jsonio import load_json

DEFAULT_VOCABULARY = Path(__file__).resolve().parent / "vocabulary.json"
FORMAT = "cir-mine vocabulary 1"
MORE, LESS = "more", "less"
_TOKEN = re.compile(r"[a-z0-9/']+")
_SLASH = re.compile(r"(?<![0-9])/|/(?![0-9])")  # "w/black" -> "w black"; "3/4" stays


@dataclass(frozen=True)
class Requested:
    # fmt: off
    positive: dict = field(default_factory=dict)     # group -> frozenset of values asked for
    negative: dict = field(default_factory=dict)     # group -> frozenset of values ruled out
    comparative: dict = field(default_factory=dict)  # group -> "more" | "less" (towards the high | low end of its order)
    # fmt: on

    @property
    def groups(self) -> frozenset:
        return frozenset(self.positive) | frozenset(self.negative) | frozenset(self.comparative)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def as_strings(self) -> list[str]:
        """``["+color:red", "-pattern:striped", "~length:more"]``, sorted within each kind."""
        out = [f"+{g}:{v}" for g in sorted(self.positive) for v in sorted(self.positive[g])]
        out += [f"-{g}:{v}" for g in sorted(self.negative) for v in sorted(self.negative[g])]
        return out + [f"~{g}:{d}" for g, d in sorted(self.comparative.items())]


def tokens(text: str) -> tuple[str, ...]:
    """Normalised words: lower case, hyphens and punctuation as spaces ("V-Neck!" -> ("v", "neck"))."""
    t = text.lower().replace("\u2019", "'").replace("-", " ").replace("_", " ")
    t = _SLASH.sub(" ", t)
    return tuple(w.strip("'") for w in _TOKEN.findall(t) if w.strip("'"))


# ------------------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class Group:
    # fmt: off
    name: str                      # group name ("sleeve")
    values: tuple                  # value names, in file order
    order: tuple                   # ordinal groups: values low -> high; () when unordered
    exclusive: bool = False        # an item has one value of the group (tags of another value contradict)
    excludes: dict = field(default_factory=dict)  # value -> frozenset of values it cannot co-occur with (symmetric)
    # fmt: on

    def conflict(self, a: str, b: str) -> bool:
        return b in self.excludes.get(a, ()) or a in self.excludes.get(b, ())


@dataclass
class Vocabulary:
    """A parsed vocabulary file: phrase tables for matching and the gallery-attribute mapping."""

    # fmt: off
    source: str                    # file it came from
    groups: dict                   # group name -> Group
    phrases: dict                  # token tuple -> ("value" | "not", group, value) or ("cmp", group, "more" | "less")
    suffixes: dict                 # group -> {token tuple: True} of words a phrase of the group may carry
    modifiers: dict                # token tuple -> "neg" | "more" | "less"
    fillers: frozenset             # words allowed between a modifier and its phrase
    gallery: dict                  # gallery attribute -> list of (group, value, exact): exact for the vocabulary's
                                   # own "group:value" names (ground truth), partial for tags ("part:sleeveless")
    max_len: int = 1               # longest phrase, in tokens
    # fmt: on

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Read and check a vocabulary file; DataError naming the file and the fix when malformed."""
        return _parse(load_json(path, dict, hint="Pass an existing vocabulary JSON file."), str(path))

    @classmethod
    def default(cls) -> "Vocabulary":
        return _default()

    def image_evidence(self, attrs: Iterable[str]) -> dict[str, tuple[set, bool]]:
        """{group: (values, exact)}; exact when a ground-truth ``group:value`` attribute names them."""
        out: dict[str, tuple[set, bool]] = {}
        for a in attrs:
            for g, v, exact in self.gallery.get(a, ()):
                vals, ex = out.get(g, (set(), False))
                vals.add(v)
                out[g] = (vals, ex or exact)
        return out

    def extract(self, text: str) -> Requested:
        return _extract(self, tokens(text))


@functools.lru_cache(maxsize=1)
def _default() -> Vocabulary:
    return Vocabulary.load(DEFAULT_VOCABULARY)


def _bad(source: str, what: str) -> DataError:
    return DataError(
        f"{source}: {what}. Fix the vocabulary file (the shipped "
        f"miner/core/vocabulary.json shows the format) or pass another one."
    )


def _str_list(obj, source: str, where: str) -> list[str]:
    if obj is None:
        return []
    if not isinstance(obj, list) or not all(isinstance(s, str) and s.strip() for s in obj):
        raise _bad(source, f"{where} must be a list of non-empty strings")
    return obj


def _phrase_key(phrase: str, source: str, where: str) -> tuple[str, ...]:
    key = tokens(phrase)
    if not key:
        raise _bad(source, f"{where}: phrase {phrase!r} has no words")
    return key


def _parse(obj: dict, source: str) -> Vocabulary:
    fmt = obj.get("format")
    if fmt != FORMAT:
        raise _bad(source, f"'format' must be {FORMAT!r}, found {fmt!r}")
    groups_obj = obj.get("groups")
    if not isinstance(groups_obj, dict) or not groups_obj:
        raise _bad(source, "'groups' must be a non-empty object (group -> {values: ...})")
    phrases: dict = {}
    where_of: dict = {}

    def add(key: tuple, entry: tuple, where: str) -> None:
        if key in phrases and phrases[key] != entry:
            raise _bad(
                source,
                f"phrase {' '.join(key)!r} is used twice ({where_of[key]} and {where}); keep each phrase in one place",
            )
        phrases[key], where_of[key] = entry, where

    modifiers: dict = {}
    for kind, name in (("neg", "negators"), ("more", "more"), ("less", "less")):
        for p in _str_list(obj.get(name), source, f"'{name}'"):
            modifiers[_phrase_key(p, source, f"'{name}'")] = kind
    fillers = frozenset(w for p in _str_list(obj.get("fillers"), source, "'fillers'") for w in tokens(p))
    groups, suffixes, gallery = {}, {}, {}
    for g, spec in groups_obj.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("values"), dict) or not spec["values"]:
            raise _bad(source, f"group {g!r} must be an object with a non-empty 'values' object")
        values = spec["values"]
        excludes: dict = {}
        for v, vspec in values.items():
            where = f"{g}:{v}"
            if not isinstance(vspec, dict):
                raise _bad(source, f"value {where} must be an object with 'phrases'")
            if "phrases" not in vspec:
                raise _bad(source, f"value {where} has no 'phrases' list")
            for p in _str_list(vspec["phrases"], source, f"{where} 'phrases'"):
                add(_phrase_key(p, source, where), ("value", g, v), where)
            for p in _str_list(vspec.get("not"), source, f"{where} 'not'"):
                add(_phrase_key(p, source, where), ("not", g, v), f"{where} 'not'")
            for a in _str_list(vspec.get("gallery"), source, f"{where} 'gallery'"):
                if ":" not in a:
                    raise _bad(source, f"{where} 'gallery' entry {a!r} must be a group:value attribute")
                if (g, v, False) not in gallery.setdefault(a, []):
                    gallery[a].append((g, v, False))
            excludes[v] = frozenset(_str_list(vspec.get("excludes"), source, f"{where} 'excludes'"))
            unknown = sorted(excludes[v] - set(values))
            if unknown:
                raise _bad(source, f"{where} 'excludes' names unknown value {unknown[0]!r}; list values of group {g!r}")
        order = _str_list(spec.get("order"), source, f"group {g!r} 'order'")
        unknown = [v for v in order if v not in values]
        if unknown:
            raise _bad(source, f"group {g!r} 'order' names unknown value {unknown[0]!r}; list only the group's values")
        for direction in (MORE, LESS):
            cmp = _str_list(spec.get(direction), source, f"group {g!r} '{direction}'")
            if cmp and not order:
                raise _bad(source, f"group {g!r} has '{direction}' phrases but no 'order' (its values low to high)")
            for p in cmp:
                add(_phrase_key(p, source, g), ("cmp", g, direction), f"{g} '{direction}'")
        suffixes[g] = {
            _phrase_key(p, source, g): True for p in _str_list(spec.get("suffixes"), source, f"group {g!r} 'suffixes'")
        }
        exclusive = spec.get("exclusive", False)
        if not isinstance(exclusive, bool):
            raise _bad(source, f"group {g!r} 'exclusive' must be true or false")
        groups[g] = Group(g, tuple(values), tuple(order), exclusive, excludes)
    for g, group in groups.items():  # the vocabulary's own names are exact unless a value lists them as a tag
        for v in group.values:
            gallery.setdefault(f"{g}:{v}", [(g, v, True)])
    max_len = max(len(k) for k in [*phrases, *modifiers, *(s for d in suffixes.values() for s in d)])
    return Vocabulary(source, groups, phrases, suffixes, modifiers, fillers, gallery, max_len)


def load_vocabulary(path: Optional[str | Path] = None) -> Vocabulary:
    """The vocabulary at ``path``, or the shipped default when None."""
    return Vocabulary.default() if path is None else Vocabulary.load(path)


# ------------------------------------------------------------------------------------------------
# Extraction


def _longest(table: dict, toks: tuple, i: int, max_len: int):
    for n in range(min(max_len, len(toks) - i), 0, -1):
        hit = table.get(toks[i : i + n])
        if hit is not None:
            return hit, n
    return None, 0


def _towards(group: Group, value: str) -> Optional[str]:
    """Direction of "more <value>" on an ordinal group (None when the value is not ranked)."""
    if value not in group.order:
        return None
    return MORE if group.order.index(value) >= len(group.order) / 2 else LESS


_FLIP = {MORE: LESS, LESS: MORE}
_MAX_FILLERS = 3


def _extract(vocab: Vocabulary, toks: tuple) -> Requested:
    pos: dict[str, set] = {}
    neg: dict[str, set] = {}
    comp: dict[str, str] = {}
    pending, gap, chain = None, 0, False
    i, n = 0, len(toks)
    while i < n:
        entry, length = _longest(vocab.phrases, toks, i, vocab.max_len)
        mod, mod_len = _longest(vocab.modifiers, toks, i, vocab.max_len)
        if entry is not None and length >= mod_len:
            kind, g, x = entry
            group = vocab.groups[g]
            if kind == "cmp":
                comp[g] = _FLIP[x] if pending in ("neg", LESS) else x
            else:
                ruled_out = kind == "not"
                direction = _towards(group, x) if kind == "value" and pending in (MORE, LESS) else None
                if direction is not None:
                    comp[g] = direction if pending == MORE else _FLIP[direction]
                else:
                    if pending in ("neg", LESS):
                        ruled_out = not ruled_out
                    (neg if ruled_out else pos).setdefault(g, set()).add(x)
            # "no sleeves or collar": a negation (own or in the phrase) carries over "or"
            chain = pending == "neg" or vocab.modifiers.get(toks[i : i + 1]) == "neg"
            pending, gap = None, 0
            i += length
            i += _longest(vocab.suffixes[g], toks, i, vocab.max_len)[1]
            continue
        if mod is not None:
            pending, gap, chain = mod, 0, False
            i += mod_len
            continue
        word = toks[i]
        if chain and word in ("or", "nor"):
            pending, gap = "neg", 0
        elif pending is not None and word in vocab.fillers and gap < _MAX_FILLERS:
            gap += 1
        else:
            pending, gap = None, 0
        chain = False
        i += 1
    return Requested({g: frozenset(v) for g, v in pos.items()}, {g: frozenset(v) for g, v in neg.items()}, comp)


def extract(text: str, vocab: Optional[Vocabulary] = None) -> Requested:
    """Requested attributes of one caption (or captions joined with " and ")."""
    return (vocab or Vocabulary.default()).extract(text)


def extract_many(texts: Iterable[str], vocab: Optional[Vocabulary] = None) -> list[Requested]:
    v = vocab or Vocabulary.default()
    return [v.extract(t) for t in texts]


# ------------------------------------------------------------------------------------------------
# Gallery attributes


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


def _compare(group: Group, cand: set, ref: set, direction: str, exact: bool) -> Optional[bool]:
    """Whether ``cand`` lies ``direction`` of ``ref`` on the group's order (None: cannot tell).

    Equal ranks are False for exact (ground-truth) values and None for tags, which are coarse
    ("long sleeve" covers sleeves of several lengths)."""
    rc = [group.order.index(v) for v in cand if v in group.order]
    rr = [group.order.index(v) for v in ref if v in group.order]
    if not rc or not rr:
        return None
    if direction == LESS:
        rc, rr = [-r for r in rc], [-r for r in rr]
    if min(rc) > max(rr):
        return True
    if max(rc) < min(rr) or (exact and max(rc) <= min(rr)):
        return False
    return None


def _judge(group: Group, vals: set, exact: bool, pos: frozenset, neg: frozenset) -> Optional[bool]:
    """Positive/negative request on one group against an image's values (see requested_status)."""
    decisive = exact or group.exclusive
    verdict: Optional[bool] = True
    if pos and not vals & pos:
        # every asked value conflicts with something the image has -> contradicted
        blocked = all(any(group.conflict(p, v) for v in vals) for p in pos)
        verdict = False if decisive or blocked else None
    if neg:
        if vals & neg:
            return False
        if not pos and not decisive and not all(any(group.conflict(n, v) for v in vals) for n in neg):
            verdict = None
    return verdict


def requested_status(
    attrs: Iterable[str], req: Requested, vocab: Optional[Vocabulary] = None, ref_attrs: Optional[Iterable[str]] = None
) -> dict[str, Optional[bool]]:
    """Per requested group: True (satisfied), False (contradicted), None (the gallery cannot tell).

    ``attrs`` are an image's gallery attributes (synthetic ``sleeve:short`` or FashionIQ tags such
    as ``part:sleeveless``), mapped onto the vocabulary's values. The vocabulary's own
    ``group:value`` names are ground truth (one value per group); tags are partial evidence: an
    image tagged with another value contradicts a positive request only in ``exclusive`` groups
    (sleeve, length, neckline, ...) or when the values exclude each other (solid vs striped).
    A value the image carries and the caption rules out is always a contradiction. A comparative
    is judged only with ``ref_attrs`` (the reference image's attributes), when both images have a
    ranked value and the ranks differ. A group judged both ways is False if any part is False.
    """
    vocab = vocab or Vocabulary.default()
    attrs = list(attrs)
    have = vocab.image_evidence(attrs)
    ref = vocab.image_evidence(ref_attrs) if ref_attrs is not None else {}
    out: dict[str, Optional[bool]] = {}
    for g in req.groups:
        vals, exact = have.get(g, (set(), False))
        group = vocab.groups.get(g)
        if group is None:  # a group the vocabulary lacks: raw group:value attributes, exact
            vals, exact, group = group_values(attrs).get(g, set()), True, Group(g, (), ())
        verdicts = []
        if vals and group is not None and (g in req.positive or g in req.negative):
            verdicts.append(
                _judge(group, vals, exact, req.positive.get(g, frozenset()), req.negative.get(g, frozenset()))
            )
        if g in req.comparative and group is not None and vals and g in ref:
            ref_vals, ref_exact = ref[g]
            verdicts.append(_compare(group, vals, ref_vals, req.comparative[g], exact and ref_exact))
        out[g] = False if False in verdicts else (True if True in verdicts else None)
    return out
