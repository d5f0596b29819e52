"""VID, factor transfer, CRD, OFD and ReviewKD losses against independent float64 computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_lightning import KDConfigError
from kd_lightning.losses import (
    ABF,
    CRDEmbed,
    CRDMemoryBank,
    Paraphraser,
    Translator,
    VIDRegressor,
    build_abfs,
    crd_loss,
    crd_nce_loss,
    ft_loss,
    ft_reconstruction_loss,
    hcl_loss,
    ofd_loss,
    ofd_margin,
    ofd_margin_from_bn,
    ofd_partial_l2,
    ofd_stage_weights,
    review_chain,
    vid_loss,
)

REL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def softplus64(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid64(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# =============================================================================================
# VID (Ahn et al., CVPR 2019)
# =============================================================================================
def test_vid_loss_matches_explicit_gaussian_nll():
    mean, teacher = randn(2, 3, 2, 2, seed=1), randn(2, 3, 2, 2, seed=2)
    variance = torch.tensor([0.5, 2.0, 5.0])
    m, t, v = mean.double().numpy(), teacher.double().numpy(), variance.double().numpy()
    total, count = 0.0, 0
    for b, c, h, w in itertools.product(range(2), range(3), range(2), range(2)):
        total += 0.5 * (math.log(v[c]) + (t[b, c, h, w] - m[b, c, h, w]) ** 2 / v[c])
        count += 1
    assert vid_loss(mean, variance, teacher).item() == pytest.approx(total / count, rel=REL)


def test_vid_regressor_initial_variance_and_layers():
    reg = VIDRegressor(4, 6, init_variance=5.0, eps=1e-5)
    assert torch.allclose(reg.variance(), torch.full((6,), 5.0), atol=1e-6)
    convs = [m for m in reg.mean if isinstance(m, torch.nn.Conv2d)]
    # three 1x1 convolutions without bias, C_s -> C_t -> C_t -> C_t (mid defaults to C_t)
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (4, 6, (1, 1), None), (6, 6, (1, 1), None), (6, 6, (1, 1), None)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in reg.mean) == 2
    mu, var = reg(randn(2, 4, 3, 3))
    assert mu.shape == (2, 6, 3, 3) and var.shape == (6,)
    # 1D maps and vectors
    assert VIDRegressor(4, 6, dims=1)(randn(2, 4, 7))[0].shape == (2, 6, 7)
    assert VIDRegressor(4, 6, dims=0)(randn(2, 4))[0].shape == (2, 6)


def test_vid_gradient_of_variance_parameter_matches_hand_derivation():
    # L = mean 0.5 (log v_c + r^2 / v_c), v_c = softplus(alpha_c) + eps, r = t - mu
    # dL/dalpha_c = (1/n) sum_{b,p} 0.5 (1/v_c - r^2/v_c^2) * sigmoid(alpha_c)
    torch.manual_seed(0)
    reg = VIDRegressor(3, 2, init_variance=0.7, eps=1e-5)
    with torch.no_grad():
        reg.alpha.copy_(torch.tensor([-0.4, 1.3]))
    s, t = randn(2, 3, 2, 2, seed=3), randn(2, 2, 2, 2, seed=4)
    mu, var = reg(s)
    vid_loss(mu, var, t).backward()
    r = (t - mu.detach()).double().numpy()
    n = r.size
    for c in range(2):
        a = float(reg.alpha[c].detach())
        v = softplus64(a) + 1e-5
        expected = sum(0.5 * (1 / v - r[b, c, h, w] ** 2 / v**2) * sigmoid64(a)
                       for b, h, w in itertools.product(range(2), range(2), range(2))) / n
        assert reg.alpha.grad[c].item() == pytest.approx(expected, rel=1e-5)


def test_vid_pools_a_larger_teacher_map():
    mean, teacher = randn(1, 2, 2, 2, seed=5), randn(1, 2, 4, 4, seed=6)
    var = torch.tensor([1.0, 3.0])
    expected = vid_loss(mean, var, F.avg_pool2d(teacher, 2))
    assert vid_loss(mean, var, teacher).item() == pytest.approx(expected.item(), rel=REL)


def test_vid_bad_inputs_raise_one_clear_error():
    with pytest.raises(KDConfigError, match="out_channels equal to the teacher"):
        vid_loss(randn(2, 3, 2, 2), torch.ones(3), randn(2, 4, 2, 2))
    with pytest.raises(KDConfigError, match="one value per teacher channel"):
        vid_loss(randn(2, 3, 2, 2), torch.ones(2), randn(2, 3, 2, 2))
    with pytest.raises(KDConfigError, match="init_variance"):
        VIDRegressor(2, 2, init_variance=0.0)
    with pytest.raises(KDConfigError, match="eps"):
        VIDRegressor(2, 2, eps=0.0)
    with pytest.raises(KDConfigError, match="dims"):
        VIDRegressor(2, 2, dims=3)
    with pytest.raises(KDConfigError, match=r"\[B, C, H, W\] map"):
        VIDRegressor(2, 2)(randn(2, 2, 5))


# =============================================================================================
# Factor transfer (Kim et al., NeurIPS 2018)
# =============================================================================================
def _normalised_rows(x: torch.Tensor) -> np.ndarray:
    a = x.double().reshape(x.shape[0], -1).numpy()
    out = np.zeros_like(a)
    for b in range(a.shape[0]):
        out[b] = a[b] / math.sqrt(sum(v * v for v in a[b]))
    return out


def test_ft_loss_matches_explicit_normalised_distance():
    fs, ft = randn(3, 2, 2, 2, seed=7), randn(3, 2, 2, 2, seed=8)
    d = _normalised_rows(ft) - _normalised_rows(fs)
    n_b, n_d = d.shape
    l1_mean = sum(abs(v) for v in d.flat) / (n_b * n_d)
    l1_batch = sum(sum(abs(v) for v in d[b]) for b in range(n_b)) / n_b
    l2_mean = sum(v * v for v in d.flat) / (n_b * n_d)
    l2_batch = sum(math.sqrt(sum(v * v for v in d[b])) for b in range(n_b)) / n_b
    assert ft_loss(fs, ft).item() == pytest.approx(l1_mean, rel=REL)  # p=1, element mean
    assert ft_loss(fs, ft, reduction="batchmean").item() == pytest.approx(l1_batch, rel=REL)
    assert ft_loss(fs, ft, p=2).item() == pytest.approx(l2_mean, rel=REL)
    assert ft_loss(fs, ft, p=2, reduction="batchmean").item() == pytest.approx(l2_batch, rel=REL)
    # the factors are normalised per example: rescaling one example's factor changes nothing
    scaled = fs.clone()
    scaled[1] *= 7.0
    assert ft_loss(scaled, ft).item() == pytest.approx(l1_mean, rel=1e-5)


def test_ft_reconstruction_loss_and_paraphraser_training():
    x, rec = randn(2, 4, 3, 3, seed=9), randn(2, 4, 3, 3, seed=10)
    diff = (rec.double() - x.double()).numpy()
    assert ft_reconstruction_loss(rec, x).item() == pytest.approx(
        sum(v * v for v in diff.flat) / diff.size, rel=REL)
    assert ft_reconstruction_loss(rec, x, p=1).item() == pytest.approx(
        sum(abs(v) for v in diff.flat) / diff.size, rel=REL)

    # the target is a constant
    target = x.clone().requires_grad_(True)
    ft_reconstruction_loss(rec.clone().requires_grad_(True), target).backward()
    assert target.grad is None

    # stage 1: the paraphraser learns to reconstruct a (non-negative, post-ReLU) teacher map
    torch.manual_seed(0)
    para = Paraphraser(4, rate=0.5)
    assert para.factor_channels == 2
    teacher_map = randn(8, 4, 4, 4, seed=11).relu()
    factor, recon = para(teacher_map)
    assert factor.shape == (8, 2, 4, 4) and recon.shape == teacher_map.shape
    opt = torch.optim.Adam(para.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = ft_reconstruction_loss(para(teacher_map)[1], teacher_map)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_ft_translator_matches_the_paraphraser_factor():
    para = Paraphraser(6, rate=0.5, dims=1)
    tr = Translator(3, para.factor_channels, dims=1)
    fs, ft = tr(randn(2, 3, 5)), para.encode(randn(2, 6, 5))
    assert fs.shape == ft.shape == (2, 3, 5)
    loss = ft_loss(fs, ft)
    loss.backward()
    assert all(p.grad is None for p in para.parameters())  # the teacher factor is a constant
    assert all(p.grad is not None for p in tr.parameters())


def test_ft_bad_inputs_raise_one_clear_error():
    with pytest.raises(KDConfigError, match="factor_channels=paraphraser.factor_channels"):
        ft_loss(randn(2, 3, 2, 2), randn(2, 4, 2, 2))
    with pytest.raises(KDConfigError, match="p must be 1"):
        ft_loss(randn(2, 3), randn(2, 3), p=3)
    with pytest.raises(KDConfigError, match="reduction"):
        ft_loss(randn(2, 3), randn(2, 3), reduction="sum")
    with pytest.raises(KDConfigError, match="paraphrase rate"):
        Paraphraser(4, rate=0.0)
    with pytest.raises(KDConfigError, match="C=4"):
        Paraphraser(4)(randn(2, 5, 3, 3))
    with pytest.raises(KDConfigError, match="in_channels equal"):
        ft_reconstruction_loss(randn(2, 3, 2, 2), randn(2, 4, 2, 2))


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
                assert ls[b, j].item() == pytest.approx(es, rel=REL, abs=1e-7)
                assert lt[b, j].item() == pytest.approx(et, rel=REL, abs=1e-7)


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


# =============================================================================================
# OFD (Heo et al., ICCV 2019)
# =============================================================================================
def _negative_mean_by_integration(mu: float, sigma: float) -> float:
    """E[x | x < 0] for x ~ N(mu, sigma^2) by trapezoid integration (independent of erf)."""
    x = np.linspace(mu - 14 * sigma, 0.0, 400001)
    dens = np.exp(-0.5 * ((x - mu) / sigma) ** 2)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy < 2 names it trapz
    return float(trapezoid(x * dens, x) / trapezoid(dens, x))


def test_ofd_margin_is_the_expected_negative_response():
    gamma = torch.tensor([1.0, -2.0, 0.5, 1.0, 0.0, 0.0])
    beta = torch.tensor([0.0, 0.5, -1.0, 4.0, -0.3, 2.0])
    m = ofd_margin(gamma, beta)
    assert m.dtype == torch.float32 and m.shape == (6,)
    for c in range(3):
        expected = _negative_mean_by_integration(float(beta[c]), abs(float(gamma[c])))
        assert m[c].item() == pytest.approx(expected, rel=1e-5)
    assert m[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=REL)
    # negative mass Phi(-4) < 1e-3: the authors' fallback -3 |gamma|
    assert m[3].item() == pytest.approx(-3.0)
    # a constant channel: its value if negative, else 0
    assert m[4].item() == pytest.approx(-0.3) and m[5].item() == 0.0
    assert bool((m <= 0).all())

    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(gamma[:3])
        bn.bias.copy_(beta[:3])
    assert torch.equal(ofd_margin_from_bn(bn), m[:3])
    with pytest.raises(KDConfigError, match="affine"):
        ofd_margin_from_bn(torch.nn.BatchNorm2d(3, affine=False))


def _partial_l2_explicit(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> float:
    sd, td, md = s.double().numpy(), t.double().numpy(), m.double().numpy()
    total = 0.0
    for idx in itertools.product(*(range(n) for n in sd.shape)):
        target = max(td[idx], md[idx[1]])
        if sd[idx] <= target <= 0:
            continue
        total += (target - sd[idx]) ** 2
    return total / sd.shape[0]


def test_ofd_partial_l2_matches_explicit_cases():
    margin = torch.tensor([-0.5, -1.0])
    # channel 0: every case of the partial L2 at least once
    s = torch.tensor([[[[-2.0, 0.3], [1.0, -0.2]], [[-3.0, -0.5], [0.5, 2.0]]],
                      [[[-0.1, -0.7], [0.0, 0.9]], [[-1.2, -0.9], [-2.0, 1.0]]]])
    t = torch.tensor([[[[-1.0, -2.0], [0.5, -0.1]], [[-4.0, -0.5], [1.5, -3.0]]],
                      [[[-0.3, -0.6], [2.0, -5.0]], [[-0.8, -1.5], [0.2, 0.1]]]])
    assert ofd_partial_l2(s, t, margin).item() == pytest.approx(
        _partial_l2_explicit(s, t, margin), rel=REL)
    s2, t2, m2 = randn(3, 4, 2, 3, seed=1), randn(3, 4, 2, 3, seed=2), -randn(4, seed=3).abs()
    assert ofd_partial_l2(s2, t2, m2).item() == pytest.approx(
        _partial_l2_explicit(s2, t2, m2), rel=REL)


def test_ofd_partial_l2_gradient_mask():
    s = randn(2, 3, 4, 4, seed=4).requires_grad_(True)
    t, margin = randn(2, 3, 4, 4, seed=5), torch.tensor([-0.3, -0.8, -1.5])
    ofd_partial_l2(s, t, margin).backward()
    target = torch.maximum(t, margin.view(1, 3, 1, 1))
    silent = (s.detach() <= target) & (target <= 0)
    assert silent.any() and (~silent).any()
    assert torch.all(s.grad[silent] == 0)
    expected = 2 * (s.detach() - target) / 2
    assert torch.allclose(s.grad[~silent], expected[~silent], atol=1e-6)
    # the teacher feature receives no gradient
    tt = t.clone().requires_grad_(True)
    ofd_partial_l2(s, tt, margin).backward()
    assert tt.grad is None


def test_ofd_loss_weights_stages_from_deep_to_shallow():
    assert ofd_stage_weights(3) == [0.25, 0.5, 1.0]
    feats_s = [randn(2, 2, 4, 4, seed=i) for i in range(3)]
    feats_t = [randn(2, 2, 4, 4, seed=10 + i) for i in range(3)]
    margins = [torch.tensor([-0.4, -0.9])] * 3
    expected = sum(w * _partial_l2_explicit(s, t, m)
                   for w, s, t, m in zip([0.25, 0.5, 1.0], feats_s, feats_t, margins))
    assert ofd_loss(feats_s, feats_t, margins).item() == pytest.approx(expected, rel=REL)
    # a larger teacher map is pooled to the student's size before the margin
    big_t = randn(2, 2, 8, 8, seed=20)
    assert ofd_partial_l2(feats_s[0], big_t, margins[0]).item() == pytest.approx(
        _partial_l2_explicit(feats_s[0], F.avg_pool2d(big_t, 2), margins[0]), rel=REL)


def test_ofd_bad_inputs_raise_one_clear_error():
    with pytest.raises(KDConfigError, match="connector"):
        ofd_partial_l2(randn(2, 3, 2, 2), randn(2, 4, 2, 2), torch.zeros(4))
    with pytest.raises(KDConfigError, match="3 margins for 2 channels"):
        ofd_partial_l2(randn(2, 2, 2, 2), randn(2, 2, 2, 2), torch.zeros(3))
    with pytest.raises(KDConfigError, match="one margin per student feature"):
        ofd_loss([randn(2, 2, 2, 2)], [randn(2, 2, 2, 2)], [])
    with pytest.raises(KDConfigError, match="one entry per channel"):
        ofd_margin(torch.ones(3), torch.ones(2))


# =============================================================================================
# ReviewKD (Chen et al., CVPR 2021)
# =============================================================================================
def test_review_chain_output_shapes_follow_the_teacher():
    abfs = build_abfs([4, 8, 8], [6, 10, 12])
    assert [a.fuse for a in abfs] == [True, True, False]
    assert all(a.mid_channels == 8 for a in abfs)  # min(512, deepest student channels)
    student = [randn(2, 4, 8, 8, seed=1), randn(2, 8, 4, 4, seed=2), randn(2, 8, seed=3)]
    outs = review_chain(student, abfs, out_sizes=[(16, 16), (4, 4), (1, 1)])
    assert [tuple(o.shape) for o in outs] == [(2, 6, 16, 16), (2, 10, 4, 4), (2, 12, 1, 1)]
    assert [tuple(o.shape) for o in review_chain(student, abfs)] == [
        (2, 6, 8, 8), (2, 10, 4, 4), (2, 12, 1, 1)]
    outs_1d = review_chain([randn(2, 3, 12), randn(2, 5, 6)], build_abfs([3, 5], [4, 7], dims=1))
    assert [tuple(o.shape) for o in outs_1d] == [(2, 4, 12), (2, 7, 6)]


def test_abf_fuses_with_two_channel_attention():
    torch.manual_seed(0)
    abf = ABF(3, 4, 5, fuse=True).eval()
    x, residual = randn(2, 3, 4, 4, seed=1), randn(2, 4, 2, 2, seed=2)
    y, fused = abf(x, residual)
    with torch.no_grad():
        xp = abf.conv1(x).double()
        up = residual.double().repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest
        w, b = abf.att_conv[0].weight.double().view(2, 8), abf.att_conv[0].bias.double()
        expected = torch.zeros_like(xp)
        for n, i, j in itertools.product(range(2), range(4), range(4)):
            z = torch.cat([xp[n, :, i, j], up[n, :, i, j]])
            a = torch.sigmoid(w @ z + b)
            expected[n, :, i, j] = a[0] * xp[n, :, i, j] + a[1] * up[n, :, i, j]
    assert torch.allclose(fused.double(), expected, atol=1e-6)
    assert torch.allclose(y, abf.conv2(fused), atol=1e-6)


def _block_mean(a: np.ndarray, size: int) -> np.ndarray:
    n, c, h, w = a.shape
    out = np.zeros((n, c, size, size))
    for i, j in itertools.product(range(size), range(size)):
        out[:, :, i, j] = a[:, :, i * h // size:(i + 1) * h // size,
                            j * w // size:(j + 1) * w // size].mean(axis=(2, 3))
    return out


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum((x - y) ** 2 for x, y in zip(a.flat, b.flat)) / a.size)


def test_hcl_loss_matches_explicit_pyramid():
    fs = [randn(2, 3, 8, 8, seed=1), randn(2, 3, 4, 4, seed=2), randn(2, 3, 1, 1, seed=3)]
    ft = [randn(2, 3, 8, 8, seed=4), randn(2, 3, 4, 4, seed=5), randn(2, 3, seed=6)]
    s = [f.double().numpy() for f in fs]
    t = [f.double().numpy() for f in ft[:2]] + [ft[2].double().numpy().reshape(2, 3, 1, 1)]
    # 8x8: full 1, pooled 4/2/1 with 1/2, 1/4, 1/8; 4x4: level 4 skipped, 2/1 with 1/2, 1/4
    l8 = (_mse(s[0], t[0]) + 0.5 * _mse(_block_mean(s[0], 4), _block_mean(t[0], 4))
          + 0.25 * _mse(_block_mean(s[0], 2), _block_mean(t[0], 2))
          + 0.125 * _mse(_block_mean(s[0], 1), _block_mean(t[0], 1))) / 1.875
    l4 = (_mse(s[1], t[1]) + 0.5 * _mse(_block_mean(s[1], 2), _block_mean(t[1], 2))
          + 0.25 * _mse(_block_mean(s[1], 1), _block_mean(t[1], 1))) / 1.75
    l1 = _mse(s[2], t[2])
    assert hcl_loss(fs, ft).item() == pytest.approx(l8 + l4 + l1, rel=REL)


def test_reviewkd_bad_inputs_raise_one_clear_error():
    abfs = build_abfs([4, 8], [6, 10])
    with pytest.raises(KDConfigError, match="one ABF per student level"):
        review_chain([randn(2, 4, 4, 4)], abfs)
    with pytest.raises(KDConfigError, match="fuse=False"):
        review_chain([randn(2, 4, 4, 4), randn(2, 8, 2, 2)], list(abfs)[::-1])
    with pytest.raises(KDConfigError, match=r"\[B, 4, \.\.\.\]"):
        review_chain([randn(2, 5, 4, 4), randn(2, 8, 2, 2)], abfs)
    with pytest.raises(KDConfigError, match="out_sizes"):
        hcl_loss([randn(2, 6, 4, 4)], [randn(2, 6, 8, 8)])
    with pytest.raises(KDConfigError, match="decreasing"):
        hcl_loss([randn(2, 6, 4, 4)], [randn(2, 6, 4, 4)], levels=(1, 2))
    with pytest.raises(KDConfigError, match="one teacher level per student level"):
        build_abfs([4, 8], [6])


# =============================================================================================
# bf16-mixed safety
# =============================================================================================
def test_losses_compute_in_float32_from_bfloat16_inputs():
    bf = torch.bfloat16
    s, t = randn(2, 3, 4, 4, seed=1).to(bf), randn(2, 3, 4, 4, seed=2).to(bf)
    values = [
        vid_loss(s, torch.ones(3), t),
        ft_loss(s, t),
        ft_reconstruction_loss(s, t),
        ofd_partial_l2(s, t, torch.full((3,), -0.5)),
        hcl_loss([s], [t]),
        crd_nce_loss(randn(2, 5).to(bf), 1.0, 10),
    ]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in values)
