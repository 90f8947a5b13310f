"""Vectorized attribute codes: the miner's fast path over the :mod:`miner.attributes` API.

Gallery attribute lists are factorized into distinct *combos*; each combo gets
- a bitset over the attribute vocabulary (Jaccard overlap by popcount),
- a per-group value-set code (to compare a candidate with the target group by group),
- per requested group, bits for the values any caption asks for plus an "any value" bit, so that
  ``requested_status`` for [batch, depth] candidate matrices is a few integer ops.
Semantics follow ``miner.attributes.requested_status`` and ``attr_overlap``; a test checks the
equivalence on random pairs so that a new extractor behind the same API keeps them aligned.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import attributes as A

log = logging.getLogger(__name__)

ANY_BIT = np.uint64(1) << np.uint64(63)
STATUS_TRUE, STATUS_FALSE, STATUS_UNKNOWN, STATUS_NOT_ASKED = 1, 0, -1, -2


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x) if hasattr(np, "bitwise_count") else np.unpackbits(x.view(np.uint8), axis=-1).sum(-1)


@dataclass
class AttrCodes:
    combo: np.ndarray          # int32[n] combo id per gallery row
    bits: np.ndarray           # uint64[n_combo, W] attribute-vocabulary bitset per combo
    groups: list               # attribute groups (gallery and requests)
    group_code: np.ndarray     # int64[n_combo, G] id of the value set per group (0 = no value)
    req_groups: list           # groups some request names
    req_bits: np.ndarray       # uint64[n_combo, Gr] requested-value bits | ANY_BIT when the group has a value
    q_pos: np.ndarray          # uint64[m, Gr] values asked for (0 = none)
    q_neg: np.ndarray          # uint64[m, Gr] values ruled out
    q_asked: np.ndarray        # bool[m, Gr] group is requested
    q_unknown: np.ndarray      # bool[m, Gr] comparative-only request: status unknown
    q_group_asked: np.ndarray  # bool[m, G] the same over ``groups``

    @classmethod
    def build(cls, gallery_attrs: Sequence[Sequence[str]], requests: Sequence[A.Requested]) -> "AttrCodes":
        combo_of: dict = {}
        combo = np.empty(len(gallery_attrs), dtype=np.int32)
        for i, a in enumerate(gallery_attrs):
            combo[i] = combo_of.setdefault(tuple(sorted(a)), len(combo_of))
        combos = list(combo_of)
        vocab = {v: i for i, v in enumerate(sorted({x for c in combos for x in c}))}
        W = max(1, (len(vocab) + 63) // 64)
        bits = np.zeros((len(combos), W), dtype=np.uint64)
        gvals = [A.group_values(c) for c in combos]
        groups = sorted({g for gv in gvals for g in gv} | {g for r in requests for g in r.groups})
        gi = {g: i for i, g in enumerate(groups)}
        group_code = np.zeros((len(combos), len(groups)), dtype=np.int64)
        set_code: dict = {}
        for ci, (c, gv) in enumerate(zip(combos, gvals)):
            for x in c:
                j = vocab[x]
                bits[ci, j // 64] |= np.uint64(1) << np.uint64(j % 64)
            for g, vs in gv.items():
                group_code[ci, gi[g]] = set_code.setdefault((g, frozenset(vs)), len(set_code) + 1)
        req_groups = sorted({g for r in requests for g in r.groups})
        ri = {g: i for i, g in enumerate(req_groups)}
        value_bit: dict = {g: {} for g in req_groups}
        for r in requests:
            for part in (r.positive, r.negative):
                for g, vs in part.items():
                    for v in sorted(vs):
                        vb = value_bit[g]
                        if v not in vb:
                            if len(vb) >= 63:
                                log.warning("group %s: more than 63 requested values; %r shares a bit", g, v)
                            vb[v] = len(vb) % 63
        bit = lambda g, v: np.uint64(1) << np.uint64(value_bit[g][v])
        req_bits = np.zeros((len(combos), len(req_groups)), dtype=np.uint64)
        for ci, gv in enumerate(gvals):
            for g, vs in gv.items():
                if g in ri:
                    b = ANY_BIT
                    for v in vs:
                        if v in value_bit[g]:
                            b |= bit(g, v)
                    req_bits[ci, ri[g]] = b
        m, Gr = len(requests), len(req_groups)
        q_pos, q_neg = np.zeros((m, Gr), np.uint64), np.zeros((m, Gr), np.uint64)
        q_asked, q_unknown = np.zeros((m, Gr), bool), np.zeros((m, Gr), bool)
        q_group_asked = np.zeros((m, len(groups)), bool)
        for qi, r in enumerate(requests):
            for g in r.groups:
                q_asked[qi, ri[g]] = True
                q_group_asked[qi, gi[g]] = True
                q_unknown[qi, ri[g]] = g in r.comparative and g not in r.positive
            for part, arr in ((r.positive, q_pos), (r.negative, q_neg)):
                for g, vs in part.items():
                    for v in vs:
                        arr[qi, ri[g]] |= bit(g, v)
        return cls(combo, bits, groups, group_code, req_groups, req_bits, q_pos, q_neg, q_asked,
                   q_unknown, q_group_asked)

    def overlap(self, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
        """Jaccard overlap of gallery rows (broadcastable int64 arrays) -> float32, 0 when both are empty."""
        a, b = self.bits[self.combo[rows_a]], self.bits[self.combo[rows_b]]
        inter = _popcount(a & b).sum(-1)
        union = _popcount(a | b).sum(-1)
        return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)

    def status(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Requested status of candidates: int8[b, L, Gr] (1 satisfied, 0 contradicted, -1 unknown,
        -2 group not requested). ``q``: int64[b] query indices, ``rows``: int64[b, L] gallery rows."""
        have = self.req_bits[self.combo[rows]]                  # [b, L, Gr]
        pos, neg = self.q_pos[q][:, None, :], self.q_neg[q][:, None, :]
        zero = np.uint64(0)
        ok = ((pos == zero) | ((have & pos) != zero)) & ((have & neg) == zero)
        out = np.where(ok, STATUS_TRUE, STATUS_FALSE).astype(np.int8)
        unknown = (have == zero) | self.q_unknown[q][:, None, :]
        out[unknown] = STATUS_UNKNOWN
        out[~np.broadcast_to(self.q_asked[q][:, None, :], out.shape)] = STATUS_NOT_ASKED
        return out

    def group_diff(self, rows: np.ndarray, target_rows: np.ndarray) -> np.ndarray:
        """bool[b, L, G]: candidate's value set differs from the target's, per group."""
        return self.group_code[self.combo[rows]] != self.group_code[self.combo[target_rows]][:, None, :]
