"""SP, PKT, CC and NST as methods: what each transfer term ignores, what it trains, its layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.losses import kd_loss
from kd_lightning.methods import (CorrelationCongruence, NeuronSelectivityTransfer,
                                  ProbabilisticKnowledgeTransfer, SimilarityPreserving)
from kd_lightning.models import ConvNet1D
from tests.methods.test_no_auxiliary_modules import (FEATURE_METHODS, TERMS, _batch, _maps, _method, _teacher,
                                                     name)


@pytest.mark.parametrize("cls", FEATURE_METHODS, ids=name)
def test_kd_weight_adds_hinton_kd_to_the_feature_methods(cls):
    m = _method(cls, kd_weight=0.9, ce_weight=0.1, temperature=4.0)
    x, y, idx = _batch()
    terms = m.compute_losses(x, y, idx).terms
    with torch.no_grad():
        z_t = m.teacher(x)
    torch.testing.assert_close(terms["loss_kd"], 0.9 * kd_loss(m.student(x), z_t, 4.0))


# ---- what each method ignores, by construction ---------------------------------------------
def test_sp_ignores_a_rescaling_of_the_activations():
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # relu3 of the student = 3 x relu3 of the teacher
        student.conv3.weight.mul_(3.0)
        student.conv3.bias.mul_(3.0)
    terms = _method(SimilarityPreserving, student, teacher).compute_losses(*_batch()).terms
    assert terms["loss_sp"].item() < 1e-9


@pytest.mark.parametrize("cls", [ProbabilisticKnowledgeTransfer, CorrelationCongruence], ids=name)
def test_embedding_methods_ignore_a_rescaling_of_the_embedding(cls):
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.conv3.weight.mul_(2.5)
        student.conv3.bias.mul_(2.5)
    m = _method(cls, student, teacher)
    x, y, idx = _batch()
    torch.testing.assert_close(student.forward_features(x), 2.5 * teacher.forward_features(x))
    assert m.compute_losses(x, y, idx).terms[TERMS[cls][1]].item() < 1e-6


def test_nst_ignores_the_order_of_the_channels():
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        student.conv3.weight.copy_(teacher.conv3.weight[perm])
        student.conv3.bias.copy_(teacher.conv3.bias[perm])
    m = _method(NeuronSelectivityTransfer, student, teacher, student_layers=["relu3"])
    x, y, idx = _batch()
    assert not torch.allclose(_maps(student, x, ["relu3"])[0], _maps(teacher, x, ["relu3"])[0])
    assert m.compute_losses(x, y, idx).terms["loss_nst"].item() < 1e-6


@pytest.mark.parametrize("cls", FEATURE_METHODS, ids=name)
def test_the_transfer_term_alone_trains_the_tapped_layers(cls):
    m = _method(cls, ce_weight=0.0)
    x, y, idx = _batch()
    terms = m.compute_losses(x, y, idx).terms
    terms[TERMS[cls][1]].backward()
    assert m.student.conv1.weight.grad.abs().sum() > 0
    assert m.student.fc.weight.grad is None  # the head is after every tapped layer


@pytest.mark.parametrize("cls", [ProbabilisticKnowledgeTransfer, CorrelationCongruence], ids=name)
def test_embedding_methods_need_a_classifier_or_an_explicit_layer(cls):
    headless = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten())
    with pytest.raises(KDConfigError, match=rf"^{cls.__name__}: the student \(Sequential\) has no "
                                            r"nn.Linear classifier.*student_layer"):
        cls(student=headless, teacher=ConvNet1D(width=64), input_shape=[1, 40])
    m = cls(student=headless, teacher=ConvNet1D(width=64), input_shape=[1, 40], student_layer="1",
            teacher_layer="relu3")  # explicit layers, both tapped at their outputs
    assert m.compute_losses(*_batch()).terms[TERMS[cls][1]] >= 0
