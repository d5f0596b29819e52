"""CRD: embeddings, the memory bank, negatives, the NCE loss and its gradient."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning import KDConfigError
from kd_lightning.losses import CRDEmbed, CRDMemoryBank, crd_loss, crd_nce_loss


REL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


# =============================================================================================
# CRD (Tian et al., ICLR 2020)
# =============================================================================================
def test_crd_embed_is_unit_norm_float32():
    emb = CRDEmbed(12, dim=5)
    v = emb(randn(4, 3, 2, 2))
    assert v.shape == (4, 5) and v.dtype == torch.float32
    assert torch.allclose(v.norm(dim=1), torch.ones(4), atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert emb(randn(4, 12)).dtype == torch.float32
    with pytest.raises(KDConfigError, match="in_features"):
        emb(randn(4, 13))


def test_crd_bank_update_is_momentum_average_then_renormalised():
    bank = CRDMemoryBank(6, dim=3, momentum=0.5, generator=gen(0))
    before_s, before_t = bank.memory_s.clone().double(), bank.memory_t.clone().double()
    idx = torch.tensor([1, 4])
    v_s, v_t = F.normalize(randn(2, 3, seed=1), dim=1), F.normalize(randn(2, 3, seed=2), dim=1)
    bank.update(idx, v_s, v_t)
    for before, v, after in ((before_s, v_s, bank.memory_s), (before_t, v_t, bank.memory_t)):
        for row in range(6):
            if row in (1, 4):
                j = [1, 4].index(row)
                mixed = [0.5 * before[row, d].item() + 0.5 * float(v[j, d]) for d in range(3)]
                norm = math.sqrt(sum(x * x for x in mixed))
                expected = torch.tensor([x / norm for x in mixed])
                assert torch.allclose(after[row].double(), expected.double(), atol=1e-6)
            else:
                assert torch.equal(after[row].double(), before[row])
    # a repeated index (DistributedSampler padding) uses its first occurrence
    other = CRDMemoryBank(6, dim=3, generator=gen(0))
    other.update(torch.tensor([2, 2]), torch.stack([v_s[0], v_s[1]]), torch.stack([v_t[0], v_t[1]]))
    single = CRDMemoryBank(6, dim=3, generator=gen(0))
    single.update(torch.tensor([2]), v_s[:1], v_t[:1])
    assert torch.equal(other.memory_s, single.memory_s) and torch.equal(other.memory_t, single.memory_t)


def test_crd_bank_initialisation_and_state_dict_round_trip():
    bank = CRDMemoryBank(20, dim=4, generator=gen(3))
    bound = math.sqrt(3 / 4)
    assert bank.memory_s.abs().max() <= bound and not torch.equal(bank.memory_s, bank.memory_t)
    v = F.normalize(randn(3, 4, seed=4), dim=1)
    idx = torch.tensor([0, 5, 7])
    bank.update(idx, v, v)
    neg = bank.sample_negatives(idx, 4, gen(5))
    ls, lt = bank.logits(v, v, idx, neg)
    z = bank.log_normalisers(ls, lt)
    bank.set_negative_pool(torch.arange(10))
    state = bank.state_dict()
    assert set(state) == {"memory_s", "memory_t", "log_z"}  # the pool is data, not state

    restored = CRDMemoryBank(20, dim=4, generator=gen(99))
    restored.load_state_dict(state)
    for name in ("memory_s", "memory_t", "log_z"):
        assert torch.equal(getattr(restored, name), getattr(bank, name))
    # the constants are not re-estimated after a resume
    z2 = restored.log_normalisers(ls + 3.0, lt - 2.0)
    assert z2[0].item() == z[0].item() and z2[1].item() == z[1].item()
    # and the bank is a module buffer: state_dict of a parent module carries it
    parent = torch.nn.Module()
    parent.bank = bank
    assert {"bank.memory_s", "bank.memory_t", "bank.log_z"} <= set(parent.state_dict())


def test_crd_negatives_reproducible_and_exclusions():
    bank = CRDMemoryBank(30, dim=2, generator=gen(0))
    idx = torch.tensor([3, 8, 20])
    a = bank.sample_negatives(idx, 10, gen(7))
    b = bank.sample_negatives(idx, 10, gen(7))
    c = bank.sample_negatives(idx, 10, gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 10) and a.dtype == torch.long
    for row, anchor in enumerate(idx.tolist()):
        assert anchor not in a[row].tolist()  # never the positive itself
        assert len(set(a[row].tolist())) == 10  # without replacement while possible

    # class-aware negatives from a pool (few-data subset): only pool members of other classes
    pool = torch.tensor([2, 3, 5, 8, 11, 13, 20, 21])
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    bank.set_negative_pool(pool, labels)
    assert bank.num_candidates == 8
    targets = torch.tensor([1, 1, 0])  # labels of the anchors 3, 8, 20
    neg = bank.sample_negatives(idx, 4, gen(1), targets=targets)
    label_of = dict(zip(pool.tolist(), labels.tolist()))
    for row in range(3):
        assert all(n in label_of and label_of[n] != int(targets[row]) for n in neg[row].tolist())
        assert len(set(neg[row].tolist())) == 4  # anchor of class 1 has 5 candidates, class 0 has 5
    # more negatives than candidates: drawn with replacement
    many = bank.sample_negatives(idx, 12, gen(1), targets=targets)
    assert many.shape == (3, 12) and all(label_of[n] != 1 for n in many[0].tolist())


def test_crd_logits_are_scaled_dot_products_with_the_other_bank():
    # N <= (K+1) D uses the [B, N] product, N > (K+1) D gathers rows: both paths checked
    for n_data in (5, 40):
        bank = CRDMemoryBank(n_data, dim=3, temperature=0.5, generator=gen(n_data))
        v_s, v_t = F.normalize(randn(2, 3, seed=1), dim=1), F.normalize(randn(2, 3, seed=2), dim=1)
        idx, neg = torch.tensor([0, 4]), torch.tensor([[1, 2], [3, 0]])
        ls, lt = bank.logits(v_s, v_t, idx, neg)
        contrast = [[0, 1, 2], [4, 3, 0]]
        ms, mt = bank.memory_s.double().numpy(), bank.memory_t.double().numpy()
        for b in range(2):
            for j, c in enumerate(contrast[b]):
                es = sum(float(v_s[b, d]) * mt[c, d] for d in range(3)) / 0.5
                et = sum(float(v_t[b, d]) * ms[c, d] for d in range(3)) / 0.5
                # a float32 dot product of 3 terms: |error| <= 3 eps32 sum |v_d m_d| (then / 0.5)
                for got, v, m, want in ((ls, v_s, mt, es), (lt, v_t, ms, et)):
                    size = sum(abs(float(v[b, d]) * m[c, d]) for d in range(3)) / 0.5
                    bound = 3 * torch.finfo(torch.float32).eps * size
                    assert got[b, j].item() == pytest.approx(want, rel=0, abs=bound)


def test_crd_normalising_constant_estimated_once_from_first_batch():
    bank = CRDMemoryBank(50, dim=2)
    ls, lt = randn(4, 6, seed=1), randn(4, 6, seed=2)
    zs, zt = bank.log_normalisers(ls, lt)
    expected_s = math.log(50 * sum(math.exp(v) for v in ls.double().flatten().tolist()) / 24)
    expected_t = math.log(50 * sum(math.exp(v) for v in lt.double().flatten().tolist()) / 24)
    assert zs.item() == pytest.approx(expected_s, rel=REL)
    assert zt.item() == pytest.approx(expected_t, rel=REL)
    again = bank.log_normalisers(ls * 5, lt * 5)
    assert again[0].item() == zs.item() and again[1].item() == zt.item()
    # the DDP reduce hook acts on the means before the log (here: a fake average with 3x the mean)
    other = CRDMemoryBank(50, dim=2)
    zs3, _ = other.log_normalisers(ls, lt, reduce=lambda m: m * 3)
    assert zs3.item() == pytest.approx(expected_s + math.log(3), rel=REL)
    # the constants use the pool size when negatives are restricted to a pool
    pooled = CRDMemoryBank(50, dim=2)
    pooled.set_negative_pool(torch.arange(10))
    assert pooled.log_normalisers(ls, lt)[0].item() == pytest.approx(
        expected_s - math.log(5), rel=REL)


def _nce_explicit(logits: torch.Tensor, log_z: float, n: int) -> float:
    lg = logits.double().numpy()
    bsz, k = lg.shape[0], lg.shape[1] - 1
    kpn = k / n
    total = 0.0
    for b in range(bsz):
        p = [math.exp(v - log_z) for v in lg[b]]
        total += math.log(p[0] / (p[0] + kpn))
        total += sum(math.log(kpn / (pj + kpn)) for pj in p[1:])
    return -total / bsz


def test_crd_nce_loss_matches_explicit_formula_and_is_symmetric():
    ls, lt = randn(3, 5, seed=3) * 4, randn(3, 5, seed=4) * 4
    assert crd_nce_loss(ls, 2.5, 100).item() == pytest.approx(_nce_explicit(ls, 2.5, 100), rel=REL)
    total = crd_loss(ls, lt, torch.tensor(2.5), torch.tensor(1.0), 100)
    expected = _nce_explicit(ls, 2.5, 100) + _nce_explicit(lt, 1.0, 100)
    assert total.item() == pytest.approx(expected, rel=REL)


def test_crd_nce_gradient_hand_derivation_and_finite_differences():
    # dL/dl_{b,0} = -(1 - h_{b,0}) / B,  dL/dl_{b,j} = h_{b,j} / B  (j >= 1)
    logits = (randn(2, 4, seed=5) * 2).requires_grad_(True)
    log_z, n = 1.5, 20
    crd_nce_loss(logits, log_z, n).backward()
    k = 3
    for b in range(2):
        for j in range(4):
            p = math.exp(float(logits.detach()[b, j]) - log_z)
            h = p / (p + k / n)
            expected = -(1 - h) / 2 if j == 0 else h / 2
            assert logits.grad[b, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)

    # end to end on a tiny bank: gradient of the symmetric loss w.r.t. the raw embeddings
    bank = CRDMemoryBank(6, dim=3, temperature=0.5, generator=gen(2))
    idx, neg = torch.tensor([0, 3]), torch.tensor([[1, 2, 5], [4, 0, 1]])
    v_s, v_t = randn(2, 3, seed=6), randn(2, 3, seed=7)
    bank.log_normalisers(*bank.logits(v_s, v_t, idx, neg))

    def f(a, b):
        ls, lt = bank.logits(a, b, idx, neg)
        zs, zt = bank.log_normalisers(ls, lt)
        return crd_loss(ls, lt, zs, zt, bank.num_candidates)

    vs = v_s.clone().requires_grad_(True)
    f(vs, v_t).backward()
    h = 1e-2
    for b, d in itertools.product(range(2), range(3)):
        plus, minus = v_s.clone(), v_s.clone()
        plus[b, d] += h
        minus[b, d] -= h
        fd = (f(plus, v_t).item() - f(minus, v_t).item()) / (2 * h)
        assert vs.grad[b, d].item() == pytest.approx(fd, rel=1e-3, abs=1e-4)
    # the bank itself is a constant: no gradient, untouched by the loss
    assert not bank.memory_s.requires_grad and not bank.memory_t.requires_grad


def test_crd_bad_inputs_raise_one_clear_error():
    bank = CRDMemoryBank(10, dim=2)
    v = F.normalize(randn(2, 2), dim=1)
    with pytest.raises(KDConfigError, match=r"\[0, 10\)"):
        bank.update(torch.tensor([0, 10]), v, v)
    with pytest.raises(KDConfigError, match="CRDEmbed"):
        bank.update(torch.tensor([0, 1]), randn(2, 3), v)
    with pytest.raises(KDConfigError, match="no labels"):
        bank.sample_negatives(torch.tensor([0, 1]), 3, gen(0), targets=torch.tensor([0, 1]))
    with pytest.raises(KDConfigError, match="num_negatives"):
        bank.sample_negatives(torch.tensor([0, 1]), 0, gen(0))
    with pytest.raises(KDConfigError, match=r"K>=1"):
        bank.logits(v, v, torch.tensor([0, 1]), torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(KDConfigError, match="temperature"):
        CRDMemoryBank(10, temperature=0.0)
    with pytest.raises(KDConfigError, match="momentum"):
        CRDMemoryBank(10, momentum=1.0)
    with pytest.raises(KDConfigError, match="duplicates"):
        bank.set_negative_pool(torch.tensor([1, 1, 2]))
    with pytest.raises(KDConfigError, match="one label per pool entry"):
        bank.set_negative_pool(torch.tensor([1, 2, 3]), torch.tensor([0, 1]))
    with pytest.raises(KDConfigError, match=r"\[B, 1 \+ K\]"):
        crd_nce_loss(randn(2, 1), 0.0, 10)


# ---- the negatives' distribution, by its statistics ----------------------------------------
def _chi2(counts: torch.Tensor) -> float:
    """Pearson's statistic of ``counts`` against equal expected counts."""
    counts = counts.double()
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def _chi2_bound(cells: int) -> float:
    # the statistic has mean cells - 1 and standard deviation sqrt(2 (cells - 1)); this bound
    # is about 6 standard deviations out (the draws are seeded, so the test is deterministic)
    return cells - 1 + 6 * math.sqrt(2 * (cells - 1))


def _draw_many(bank, anchors, k, rounds, targets=None, seed=0):
    g = gen(seed)
    return torch.cat([bank.sample_negatives(anchors, k, g, targets=targets) for _ in range(rounds)])


@pytest.mark.parametrize("k", [3, 9, 12, 20],
                         ids=["rejection", "rejection-half", "keys", "replacement"])
def test_uniform_negatives_never_the_anchor_and_equally_frequent(k):
    # pool: the bank's 19 rows; the anchor 6 has 18 candidates: K = 3 and 9 draw distinct ranks by
    # redrawing repeats, K = 12 (> 18 / 2) by random keys, K = 20 (> 18) with replacement
    bank = CRDMemoryBank(19, dim=2, generator=gen(0))
    anchors = torch.full((500,), 6)
    neg = _draw_many(bank, anchors, k, rounds=8, seed=k)
    assert neg.shape == (4000, k)
    assert not (neg == 6).any()
    counts = torch.bincount(neg.flatten(), minlength=19)
    assert counts[6] == 0
    others = torch.cat([counts[:6], counts[7:]])
    assert _chi2(others) < _chi2_bound(18)
    distinct = torch.tensor([len(set(row)) for row in neg.tolist()])
    if k <= 18:
        assert (distinct == k).all()  # without replacement
    else:
        assert (distinct < k).all()  # 20 draws among 18: repeats, as with replacement


def test_negatives_are_uniform_over_sets_of_k():
    # every 3-subset of the 7 candidates (35 of them) equally likely, and every order of draws
    # by rejection of repeats: checked on the sets themselves
    bank = CRDMemoryBank(8, dim=2, generator=gen(0))
    neg = _draw_many(bank, torch.full((2000,), 0), 3, rounds=10, seed=1)
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(1, 8), 3))}
    ids = torch.tensor([subsets[tuple(sorted(row))] for row in neg.tolist()])
    assert _chi2(torch.bincount(ids, minlength=35)) < _chi2_bound(35)


def test_class_aware_negatives_have_exactly_the_allowed_support_uniformly():
    # a few-data pool of 14 rows of a bank of 40, with two unlabelled (-1) examples
    bank = CRDMemoryBank(40, dim=2, generator=gen(0))
    pool = torch.tensor([1, 4, 5, 9, 12, 17, 18, 22, 25, 26, 30, 33, 36, 39])
    labels = torch.tensor([0, 2, 1, 0, -1, 2, 1, 1, 0, 2, -1, 0, 1, 2])
    bank.set_negative_pool(pool, labels)
    label_of = dict(zip(pool.tolist(), labels.tolist()))
    # anchors: labelled in the pool (of each class), unlabelled in the pool, labelled outside
    # the pool, and one whose target (0) differs from its pool label (2): it is still excluded
    cases = [(9, 0), (5, 1), (4, 2), (12, -1), (7, 1), (39, 0)]
    for anchor, y in cases:
        allowed = [i for i in pool.tolist() if i != anchor and (y < 0 or label_of[i] != y)]
        for k in (2, len(allowed) - 1, len(allowed) + 3):
            neg = _draw_many(bank, torch.full((400,), anchor), k, rounds=5,
                             targets=torch.full((400,), y), seed=anchor + k)
            seen = set(neg.flatten().tolist())
            assert seen == set(allowed), (anchor, y, k)  # every allowed one, nothing else
            counts = torch.bincount(neg.flatten(), minlength=40)[allowed]
            assert _chi2(counts) < _chi2_bound(len(allowed)), (anchor, y, k)
            if k <= len(allowed):
                assert all(len(set(row)) == k for row in neg.tolist())


def test_anchors_of_one_batch_draw_independently_and_mixed_batches_follow_the_smallest():
    bank = CRDMemoryBank(12, dim=2, generator=gen(0))
    bank.set_negative_pool(torch.arange(12), torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2]))
    # class 0 anchors have 4 candidates, class 1 anchors 10: K = 5 exceeds the fewest, so every
    # anchor draws with replacement (as the reference code does per example)
    idx, y = torch.tensor([0, 8]), torch.tensor([0, 1])
    neg = bank.sample_negatives(idx, 5, gen(3), targets=y)
    assert set(neg[0].tolist()) <= {8, 9, 10, 11}
    assert set(neg[1].tolist()) <= {0, 1, 2, 3, 4, 5, 6, 7, 10, 11}
    many = _draw_many(bank, idx, 5, rounds=200, targets=y)
    assert any(len(set(row)) < 5 for row in many[1::2].tolist())  # class 1 rows repeat too
    # two identical anchors in one batch get different draws (independent rows)
    rows = bank.sample_negatives(torch.tensor([9, 9, 9, 9]), 3, gen(4),
                                 targets=torch.tensor([1, 1, 1, 1]))
    assert len({tuple(sorted(r)) for r in rows.tolist()}) > 1


def test_crd_logits_with_a_few_data_pool_are_the_scores_against_the_gathered_rows():
    # a pool of 12 of 50 rows (a few-data subset): the scores come from a product with the pool's
    # rows only, and equal v . m[c] / tau for the positive and every negative
    bank = CRDMemoryBank(50, dim=8, temperature=0.1, generator=torch.Generator().manual_seed(0))
    pool = torch.randperm(50, generator=torch.Generator().manual_seed(1))[:12]
    bank.set_negative_pool(pool, torch.arange(12) % 3)
    v_s, v_t = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    for idx in (pool[[0, 4, 5, 7, 11]], torch.tensor([int(pool[0]), 49 if 49 not in pool else 48, 3, 3, 3])):
        neg = bank.sample_negatives(idx, 6, torch.Generator().manual_seed(2))
        logits_s, logits_t = bank.logits(v_s, v_t, idx, neg)
        contrast = torch.cat([idx.unsqueeze(1), neg], dim=1)
        want_s = torch.einsum("bd,bkd->bk", v_s, bank.memory_t[contrast]) / 0.1
        want_t = torch.einsum("bd,bkd->bk", v_t, bank.memory_s[contrast]) / 0.1
        assert torch.allclose(logits_s, want_s, rtol=1e-5, atol=1e-5)
        assert torch.allclose(logits_t, want_t, rtol=1e-5, atol=1e-5)
