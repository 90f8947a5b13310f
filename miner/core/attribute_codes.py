"""Vectorized attribute codes: the miner's fast path over the :mod:`cir_mine.miner.core.attributes` API.

Gallery attribute lists are factorized into distinct *combos*; each combo gets
- a bitset over the attribute vocabulary (Jaccard overlap by popcount),
- a per-group value-set code (to compare a candidate with the target group by group).
Requested status is computed by ``cir_mine.miner.core.attributes.requested_status`` itself, once per distinct
(request part, image evidence) pair per requested group, into small lookup tables; a [batch, depth]
candidate matrix then needs only integer gathers. The evidence key of an image for a group is what
the API can read (the vocabulary's evidence for the group and the raw ``group:value`` set), so the
tables hold exactly the API's answers; a test checks the equivalence on random pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from cir_mine.miner.core import attributes as A

log = logging.getLogger(__name__)

STATUS_TRUE, STATUS_FALSE, STATUS_UNKNOWN, STATUS_NOT_ASKED = 1, 0, -1, -2
_CODE = {True: STATUS_TRUE, False: STATUS_FALSE, None: STATUS_UNKNOWN}


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x) if hasattr(np, "bitwise_count") else np.unpackbits(x.view(np.uint8), axis=-1).sum(-1)


def _evidence_fn():
    """attrs -> {group: hashable evidence} as requested_status sees it (vocabulary + raw groups)."""
    vocab = A.Vocabulary.default()

    def fn(attrs) -> dict:
        raw = {g: frozenset(v) for g, v in A.group_values(attrs).items()}
        vocab_ev = {g: (frozenset(v), bool(x)) for g, (v, x) in vocab.image_evidence(list(attrs)).items()}
        return {g: (vocab_ev.get(g), raw.get(g)) for g in set(raw) | set(vocab_ev)}

    return fn


@dataclass
class AttrCodes:
    # fmt: off
    combo: np.ndarray          # int32[n] combo id per gallery row
    bits: np.ndarray           # uint64[n_combo, W] attribute-vocabulary bitset per combo
    groups: list               # raw attribute groups (gallery and requests)
    group_code: np.ndarray     # int64[n_combo, G] id of the value set per group (0 = no value)
    req_groups: list           # groups some request names
    cand_key: np.ndarray       # int32[n_combo, Gr] evidence key of each combo per requested group
    q_key: np.ndarray          # int32[m, Gr] request-part key per query and group (-1: not asked)
    tables: list               # per requested group: int8[n_q_keys, n_cand_keys] status table
    q_group_asked: np.ndarray  # bool[m, G] the query requests this raw group
    # fmt: on

    @classmethod
    def build(
        cls,
        gallery_attrs: Sequence[Sequence[str]],
        requests: Sequence[A.Requested],
        ref_rows: Optional[np.ndarray] = None,
    ) -> "AttrCodes":
        """``requests``: one per query; ``ref_rows``: int64[m] the queries' reference rows (comparatives)."""
        if hasattr(gallery_attrs, "combos"):  # AttrLists: vectorized over rows
            combo, combos = gallery_attrs.combos()
        else:
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
        m = len(requests)
        q_group_asked = np.zeros((m, len(groups)), bool)
        for qi, r in enumerate(requests):
            for g in r.groups:
                q_group_asked[qi, gi[g]] = True
        req_groups = sorted({g for r in requests for g in r.groups})
        ri = {g: i for i, g in enumerate(req_groups)}
        cand_key = np.zeros((len(combos), len(req_groups)), np.int32)
        q_key = np.full((m, len(req_groups)), -1, np.int32)
        tables = []
        if req_groups:
            evidence = _evidence_fn()
            combo_ev = [evidence(c) for c in combos]
            ckeys: list = [dict() for _ in req_groups]  # evidence -> key, per group
            crep: list = [[] for _ in req_groups]  # key -> representative combo
            for ci, ev in enumerate(combo_ev):
                for g, j in ri.items():
                    e = ev.get(g)
                    k = ckeys[j].setdefault(e, len(ckeys[j]))
                    if k == len(crep[j]):
                        crep[j].append(ci)
                    cand_key[ci, j] = k
            qkeys: list = [dict() for _ in req_groups]
            qrep: list = [[] for _ in req_groups]  # key -> (Requested restricted to g, ref attrs)
            for qi, r in enumerate(requests):
                ref_combo = int(combo[ref_rows[qi]]) if ref_rows is not None else None
                for g in r.groups:
                    j = ri[g]
                    comp = r.comparative.get(g)
                    ref_e = combo_ev[ref_combo].get(g) if (comp and ref_combo is not None) else None
                    part = (r.positive.get(g), r.negative.get(g), comp, ref_e)
                    k = qkeys[j].setdefault(part, len(qkeys[j]))
                    if k == len(qrep[j]):
                        sub = A.Requested(
                            {g: r.positive[g]} if g in r.positive else {},
                            {g: r.negative[g]} if g in r.negative else {},
                            {g: comp} if comp else {},
                        )
                        qrep[j].append((sub, list(combos[ref_combo]) if ref_combo is not None else None))
                    q_key[qi, j] = k
            for j, g in enumerate(req_groups):
                t = np.empty((len(qrep[j]), len(crep[j])), np.int8)
                for a, (sub, ref_attrs) in enumerate(qrep[j]):
                    for b, ci in enumerate(crep[j]):
                        t[a, b] = _CODE[A.requested_status(list(combos[ci]), sub, ref_attrs=ref_attrs).get(g)]
                tables.append(t)
        return cls(combo, bits, groups, group_code, req_groups, cand_key, q_key, tables, q_group_asked)

    def overlap(self, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
        """Jaccard overlap of gallery rows (broadcastable int64 arrays) -> float32, 0 when both are empty."""
        a, b = self.bits[self.combo[rows_a]], self.bits[self.combo[rows_b]]
        inter = _popcount(a & b).sum(-1)
        union = _popcount(a | b).sum(-1)
        return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)

    def status(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Requested status of candidates: int8[b, L, Gr] (1 satisfied, 0 contradicted, -1 unknown,
        -2 group not requested). ``q``: int64[b] query indices, ``rows``: int64[b, L] gallery rows."""
        b, L = rows.shape
        out = np.full((b, L, len(self.req_groups)), STATUS_NOT_ASKED, np.int8)
        c = self.combo[rows]
        for j, t in enumerate(self.tables):
            qk = self.q_key[q, j]
            asked = qk >= 0
            if asked.any():
                out[asked, :, j] = t[qk[asked][:, None], self.cand_key[c[asked], j]]
        return out

    def group_diff(self, rows: np.ndarray, target_rows: np.ndarray) -> np.ndarray:
        """bool[b, L, G]: candidate's value set differs from the target's, per group."""
        return self.group_code[self.combo[rows]] != self.group_code[self.combo[target_rows]][:, None, :]
