"""Factor transfer: the factor loss, the paraphraser's reconstruction loss and the translator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.losses import Paraphraser, Translator, ft_loss, ft_reconstruction_loss


REL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


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
