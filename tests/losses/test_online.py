"""Deep mutual learning's loss: each peer's cross-entropy plus its mean KL to the others."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd_lightning.losses import deep_mutual_learning_loss
from kd_lightning.models import MLP


def _mlp(width: int = 16) -> nn.Module:
    return MLP(input_dim=40, hidden_dims=[width], num_classes=10)


# ---- the loss ---------------------------------------------------------------------------------
def test_loss_matches_hand_computation_for_three_peers():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    others = [torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]]),
              torch.tensor([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])]
    y = torch.tensor([0, 2])

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    ce = -sum(math.log(softmax(z[b].tolist())[y[b]]) for b in range(2)) / 2
    kls = [sum(kl(softmax(o[b].tolist()), softmax(z[b].tolist())) for b in range(2)) / 2
           for o in others]
    total, got_ce, got_kl = deep_mutual_learning_loss(z, others, y)
    assert got_ce.item() == pytest.approx(ce, rel=1e-5)
    assert got_kl.item() == pytest.approx(sum(kls) / 2, rel=1e-5)  # mean over the K - 1 = 2 others
    assert total.item() == pytest.approx(ce + sum(kls) / 2, rel=1e-5)
    # weights and temperature: w_ce CE + w_kd T^2 mean KL(p_l^T || p_k^T)
    t = 2.0
    kls_t = [sum(kl(softmax((o[b] / t).tolist()), softmax((z[b] / t).tolist())) for b in range(2)) / 2
             for o in others]
    total_t, _, _ = deep_mutual_learning_loss(z, others, y, temperature=t, ce_weight=0.3, kd_weight=2.0)
    assert total_t.item() == pytest.approx(0.3 * ce + 2.0 * t * t * sum(kls_t) / 2, rel=1e-5)


def test_loss_gradient_reaches_only_its_own_peer():
    torch.manual_seed(0)
    peers = [_mlp(), _mlp(), _mlp(8)]
    x, y = torch.randn(5, 1, 40), torch.randint(0, 10, (5,))
    logits = [p(x) for p in peers]
    loss, _, _ = deep_mutual_learning_loss(logits[1], [logits[0], logits[2]], y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peers[1].parameters())
    for other in (peers[0], peers[2]):
        assert all(p.grad is None for p in other.parameters())


def test_loss_needs_another_peer():
    with pytest.raises(ValueError, match="other peer"):
        deep_mutual_learning_loss(torch.zeros(2, 3), [], torch.zeros(2, dtype=torch.long))
