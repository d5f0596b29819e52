"""VID as a method: its terms from the networks' feature maps."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd_lightning.losses.vid import vid_loss
from kd_lightning.methods import VID
from tests.methods.test_auxiliary_modules import _batch, _make, _manual_maps


# ---- the terms against explicit computations -------------------------------------------------
def test_vid_terms():
    m = _make(VID, transfer_weight=0.37)
    x, y, idx = _batch()
    losses = m.compute_losses(x, y, idx)
    _, s = _manual_maps(m.student, x)
    _, t = _manual_maps(m.teacher, x)
    expected = sum(vid_loss(*reg(a), b) for reg, a, b in zip(m.regressors, s, t))
    assert torch.allclose(losses.terms["loss_vid"], 0.37 * expected)
    assert torch.allclose(losses.terms["loss_ce"], F.cross_entropy(m.student(x), y))
    # a regressor per pair: student 16 channels -> hidden 32 -> teacher 32, one variance per channel
    assert m.regressors[0].mean[0].weight.shape == (32, 16, 1) and m.regressors[0].alpha.shape == (32,)
    # the initial variance 5: the NLL of a constant teacher map equals its closed form
    reg = m.regressors[2]
    mu, var = reg(s[2])
    assert torch.allclose(var, torch.full((32,), 5.0), atol=1e-4)
    by_hand = (0.5 * (math.log(5.0) + (t[2] - mu).pow(2) / 5.0)).mean()
    assert torch.allclose(vid_loss(mu, var, t[2]), by_hand, atol=1e-5)
