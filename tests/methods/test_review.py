"""ReviewKD as a method: its terms, its warm-up, and a pooled embedding as the deepest level."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.losses import hcl_loss, review_chain
from kd_lightning.methods import ReviewKD
from kd_lightning.models import resnet8
from tests.methods.test_auxiliary_modules import _at_epoch, _batch, _make, _manual_maps


def test_reviewkd_terms_and_warmup():
    m = _make(ReviewKD, transfer_weight=5.0, warmup_epochs=20)
    x, y, idx = _batch()
    _, s_post = _manual_maps(m.student, x)
    t_pre, _ = _manual_maps(m.teacher, x)  # the teacher's levels are pre-ReLU
    hcl = hcl_loss(review_chain(s_post, m.abfs, [(19,), (10,), (5,)]), t_pre)
    for epoch, warm in ((0, 1 / 20), (4, 5 / 20), (19, 1.0), (30, 1.0)):
        _at_epoch(m, epoch, max_epochs=40)
        losses = m.compute_losses(x, y, idx)
        assert torch.allclose(losses.terms["loss_review"], 5.0 * warm * hcl, rtol=1e-5)
        assert torch.allclose(losses.logged["loss_hcl"], hcl, rtol=1e-5)
    # a fraction of max_epochs: 0.25 of 40 = 10 warm-up epochs
    m.warmup_epochs = 0.25
    _at_epoch(m, 4, max_epochs=40)
    assert m.warmup_factor() == pytest.approx(0.5)
    m.warmup_epochs = 0
    assert m.warmup_factor() == 1.0


def test_reviewkd_fuses_a_pooled_embedding_as_the_deepest_level():
    m = ReviewKD(student=resnet8(num_classes=10), teacher=resnet8(num_classes=10),
                 student_layers=["layer1", "layer2", "layer3", "fc"],
                 student_pre_activation=[False, False, False, True],
                 teacher_layers=["layer1.0.relu", "layer2.0.relu", "layer3.0.relu", "fc"],
                 input_shape=[3, 16, 16])
    assert [a.fuse for a in m.abfs] == [True, True, True, False]
    assert m.abfs[0].mid_channels == 64  # min(512, channels of the deepest level)
    assert m.out_sizes == [(16, 16), (8, 8), (4, 4), None]
    x = torch.randn(4, 3, 16, 16)
    losses = m.train().compute_losses(x, torch.arange(4), torch.arange(4))
    assert torch.isfinite(losses.terms["loss_review"])
