"""OFD as a method: its terms, and the margins from the teacher's batch norms or from data."""

from __future__ import annotations

import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.losses import ofd_loss, ofd_margin, ofd_margin_from_bn
from kd_lightning.methods import OFD
from kd_lightning.models import resnet8, wrn_16_1
from tests.methods.test_auxiliary_modules import LAYERS3, _batch, _make, _manual_maps, _nets, _trainer


def test_ofd_terms():
    m = _make(OFD, transfer_weight=1e-3)
    x, y, idx = _batch()
    s_pre, _ = _manual_maps(m.student, x)
    t_pre, _ = _manual_maps(m.teacher, x)
    losses = m.compute_losses(x, y, idx)
    connected = [c(s) for c, s in zip(m.connectors, s_pre)]
    assert torch.allclose(losses.terms["loss_ofd"], 1e-3 * ofd_loss(connected, t_pre, m.margins))
    # by hand: margin ReLU target, partial L2 summed per example, stage weights 1/4, 1/2, 1
    explicit = 0.0
    for w, s, t, margin in zip([0.25, 0.5, 1.0], connected, t_pre, m.margins):
        target = torch.maximum(t, margin.view(1, -1, 1))
        keep = (s > target) | (target > 0)
        explicit = explicit + w * ((s - target).pow(2) * keep).sum() / x.shape[0]
    assert torch.allclose(losses.terms["loss_ofd"], 1e-3 * explicit)


def test_ofd_margins_from_the_teachers_batch_norms():
    torch.manual_seed(0)
    teacher = resnet8()
    for mod in teacher.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 2.0)
            mod.bias.data.uniform_(-1.0, 1.0)
    m = OFD(student=resnet8(), teacher=teacher, student_layers=["layer1.0.relu"], input_shape=[3, 16, 16])
    assert m.teacher_bn_layers == ["layer1.0.bn2"]  # the BN of the residual branch, before the add
    assert torch.equal(m.margins[0], ofd_margin_from_bn(teacher.layer1[0].bn2))
    # a block whose shortcut has a BN too (layer2.0: stride 2): ambiguous, so the user says which
    with pytest.raises(KDConfigError, match=r"layer2\.0\.bn2, layer2\.0\.downsample\.1.*teacher_bn_layers"):
        OFD(student=resnet8(), teacher=resnet8(), student_layers=["layer2.0.relu"], input_shape=[3, 16, 16])
    given = OFD(student=resnet8(), teacher=teacher, student_layers=["layer2.0.relu"],
                teacher_bn_layers=["layer2.0.bn2"], input_shape=[3, 16, 16])
    assert torch.equal(given.margins[0], ofd_margin_from_bn(teacher.layer2[0].bn2))
    # WRN: pre-activation blocks, the stage outputs' BN sits at the start of the next stage
    w = OFD(student=wrn_16_1(), teacher=wrn_16_1(),
            student_layers=["layer2.0.relu1", "layer3.0.relu1", "relu"], input_shape=[3, 16, 16])
    assert w.teacher_bn_layers == ["layer2.0.bn1", "layer3.0.bn1", "bn"]


def test_ofd_margins_from_data_are_the_gaussian_margins_of_the_teachers_responses():
    student, teacher = _nets()
    m = OFD(student=student, teacher=teacher, student_layers=LAYERS3, margin_source="data")
    dm = DistillDataModule("mnist1d", batch_size=50, train_subset=100)
    _trainer(limit_train_batches=1).fit(m, dm)
    x, _, _ = dm.train_dataset.get_batch(torch.arange(len(dm.train_dataset)))
    t_pre, _ = _manual_maps(teacher, x)
    for margin, t in zip(m.margins, t_pre):
        flat = t.double().transpose(0, 1).flatten(1)
        expected = ofd_margin(flat.std(1, unbiased=False), flat.mean(1))
        assert torch.allclose(margin, expected, atol=1e-5)
        assert (margin <= 0).all()
