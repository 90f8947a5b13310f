"""Losses never treat a positive as a negative: duplicate targets, extra positives, mined twins."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cir_mine.train.loss import bank_loss, hardest_in_batch, in_batch_logits, info_nce, mined_logits, triplet_margin


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_duplicate_targets_and_extra_positives_are_masked():
    q, t = unit(4, 8), unit(4, 8, seed=1)
    t[2] = t[0]  # queries 0 and 2 share a target image
    target_keys = torch.tensor([10, 11, 10, 13])
    pos_keys = torch.tensor([[10, -1], [11, 13], [10, -1], [13, -1]])  # 13 is an extra positive of query 1
    logits = in_batch_logits(q, t, target_keys, pos_keys)
    assert torch.isinf(logits[0, 2]) and torch.isinf(logits[2, 0])
    assert torch.isinf(logits[1, 3])
    assert torch.isfinite(logits.diagonal()).all()
    assert torch.isfinite(logits[3, 1])  # 11 is not a positive of query 3
    # the loss equals a cross-entropy that simply leaves the masked columns out
    loss = info_nce(q, t, target_keys, pos_keys, temperature=0.1)
    rows = [
        torch.cat([logits[i, i : i + 1], logits[i][torch.isfinite(logits[i]) & (torch.arange(4) != i)]])
        for i in range(4)
    ]
    ref = torch.stack([-F.log_softmax(r / 0.1, 0)[0] for r in rows]).mean()
    assert torch.allclose(loss, ref, atol=1e-6)


def test_mined_negative_equal_to_target_is_ignored():
    q, t = unit(3, 8), unit(3, 8, seed=1)
    tk = torch.tensor([0, 1, 2])
    pk = tk[:, None]
    neg = unit(3, 2, 8, seed=2)
    nk = torch.tensor([[5, 6], [7, -1], [8, 9]])
    base = info_nce(q, t, tk, pk, neg, nk)
    # add a "negative" that is the target itself (same key) and one that is padding: no change
    neg2 = torch.cat([neg, t[:, None, :]], dim=1)
    nk2 = torch.cat([nk, tk[:, None]], dim=1)
    assert torch.allclose(info_nce(q, t, tk, pk, neg2, nk2), base, atol=1e-6)
    assert torch.isinf(mined_logits(q, neg2, nk2, pk)[:, 2]).all()
    assert torch.isinf(mined_logits(q, neg2, nk2, pk)[1, 1])


def test_triplet_margin_counts_only_valid_negatives():
    q = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # an exact copy of the target, then an easy one
    valid = torch.tensor([[False, True]])
    assert triplet_margin(q, t, neg, valid, margin=0.2).item() == 0.0
    assert triplet_margin(q, t, neg, torch.tensor([[True, True]]), margin=0.2).item() > 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=8), st.integers(1, 4))
def test_online_hard_never_picks_a_positive(keys, k):
    b = len(keys)
    q, t = unit(b, 6), unit(b, 6, seed=3)
    tk = torch.tensor(keys)
    extra = (tk + 1) % 5
    pk = torch.stack([tk, extra], 1)
    neg, valid = hardest_in_batch(q, t, tk, pk, k)
    _, idx = in_batch_logits(q, t, tk, pk).fill_diagonal_(float("-inf")).topk(min(k, b - 1), dim=1)
    picked_keys = tk[idx]
    is_pos = (picked_keys[..., None] == pk[:, None, :]).any(-1)
    assert not (valid & is_pos).any()
    assert neg.shape == (b, min(k, b - 1), 6)


def test_static_bank_masks_twins_of_the_target():
    bank = unit(6, 4, seed=4)
    keys = torch.tensor([0, 1, 2, 3, 0, 5])  # rows 0 and 4 are one image
    q = bank[[0]].clone()
    pk = torch.tensor([[0, 3]])  # image 3 is an extra positive
    loss = bank_loss(q, bank, torch.tensor([0]), keys, pk, temperature=0.5)
    logits = torch.cat([(q @ bank[[0]].T), q @ bank[[1, 2, 5]].T], 1) / 0.5
    assert torch.allclose(loss, F.cross_entropy(logits, torch.tensor([0])), atol=1e-6)
    sampled = bank_loss(q, bank, torch.tensor([0]), keys, pk, temperature=0.5, sample=torch.tensor([4, 1]))
    logits = torch.cat([(q @ bank[[0]].T), q @ bank[[1]].T], 1) / 0.5
    assert torch.allclose(sampled, F.cross_entropy(logits, torch.tensor([0])), atol=1e-6)


def test_neg_weight_counts_each_mined_negative_w_times():
    torch.manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    t = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(5, 3, 8), dim=2)
    keys, nkeys = torch.arange(5), torch.arange(10, 25).view(5, 3)
    pos = keys.unsqueeze(1)
    assert torch.allclose(info_nce(q, t, keys, pos, neg, nkeys, neg_weight=0.0), info_nce(q, t, keys, pos))
    w, tau = 0.3, 0.05
    e_batch = torch.exp(q @ t.T / tau)
    e_neg = torch.exp(torch.einsum("bd,bkd->bk", q, neg) / tau)
    manual = -torch.log(e_batch.diag() / (e_batch.sum(1) + w * e_neg.sum(1)))
    assert torch.allclose(info_nce(q, t, keys, pos, neg, nkeys, tau, neg_weight=w), manual.mean(), atol=1e-5)
