import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses import kd_loss, response_kd_loss, soft_cross_entropy


def _softmax(v):
    e = [math.exp(a) for a in v]
    s = sum(e)
    return [a / s for a in e]


def test_kd_loss_matches_hand_computed_value():
    zs, zt, T = [1.0, 2.0, 0.5], [2.0, 0.0, 1.0], 2.0
    ps = _softmax([a / T for a in zs])
    pt = _softmax([a / T for a in zt])
    expected = T * T * sum(t * math.log(t / s) for t, s in zip(pt, ps))
    got = kd_loss(torch.tensor([zs]), torch.tensor([zt]), temperature=T)
    # float32 KL of nearby distributions loses relative precision: ~100 eps32 (1e-5)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_is_batchmean_and_zero_for_identical_logits():
    z = torch.randn(5, 7)
    assert kd_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    per = kd_loss(a, b, 3.0, reduction="none")
    assert per.shape == (4,)
    assert kd_loss(a, b, 3.0).item() == pytest.approx(per.mean().item(), rel=1e-6)
    # equals torch's KL with batchmean times T^2
    ref = F.kl_div(F.log_softmax(a / 3, -1), F.softmax(b / 3, -1), reduction="batchmean") * 9
    assert kd_loss(a, b, 3.0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_kd_gradient_is_T_times_prob_difference():
    # d/dz_s [T^2 KL(p_t || q_s)] = T (q_s - p_t) per example (Hinton et al., eq. 2), batchmean /B
    zs = torch.tensor([[0.3, -1.0, 2.0]], requires_grad=True)
    zt = torch.tensor([[1.0, 0.0, -1.0]])
    T = 4.0
    kd_loss(zs, zt, T).backward()
    expected = T * (F.softmax(zs.detach() / T, -1) - F.softmax(zt / T, -1))
    assert torch.allclose(zs.grad, expected, atol=1e-6)


def test_response_kd_combines_ce_and_kd_with_alpha():
    zs, zt, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    total, ce, kd = response_kd_loss(zs, zt, y, temperature=2.0, ce_weight=0.75, kd_weight=0.25)
    assert ce.item() == pytest.approx(F.cross_entropy(zs, y).item(), rel=1e-6)
    assert total.item() == pytest.approx(0.75 * ce.item() + 0.25 * kd.item(), rel=1e-6)
    total0, ce0, _ = response_kd_loss(zs, zt, y, ce_weight=1.0, kd_weight=0.0)
    assert total0.item() == pytest.approx(ce0.item(), rel=1e-6)


def test_teacher_logits_get_no_gradient():
    zs = torch.randn(3, 5, requires_grad=True)
    zt = torch.randn(3, 5, requires_grad=True)
    kd_loss(zs, zt).backward()
    assert zt.grad is None and zs.grad is not None


def test_kd_loss_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0.0)


def test_soft_cross_entropy_hand_value():
    z = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    q = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(z, q).item() == pytest.approx(expected, rel=1e-6)
