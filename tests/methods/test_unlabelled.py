"""Methods on batches with unlabelled rows: label terms skip them, distillation terms use them."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from kd_lightning.data import UNLABELLED, DistillDataModule
from kd_lightning.losses import (CRDMemoryBank, dkd_terms, knowledge_loss, mutual_student_loss,
                                 rule_regularized_teacher, rule_weight_loss)
from kd_lightning.methods import DecoupledKD, FitNet, MutualDistillation, ResponseKD, Supervised
from kd_lightning.models import MLP, ConvNet1D
from kd_lightning.rules import MNIST1DTemplateRule
from kd_lightning.training.term_log import TermLog
from tests.conftest import unlabelled_batch


def _check_label_and_distillation_terms(m, x, y, y_true, idx):
    """``loss_ce`` is the weighted CE of the labelled rows, with zero gradient on the logits of
    the unlabelled rows; every other term is unchanged by hiding labels (it needs none) and
    reaches the unlabelled rows."""
    keep = y != UNLABELLED
    torch.manual_seed(0)
    logits, terms, _ = m.compute_losses(x, y, idx)
    torch.manual_seed(0)
    _, terms_all_labelled, _ = m.compute_losses(x, y_true, idx)
    expected = m.ce_weight * F.cross_entropy(logits[keep].float(), y[keep])
    torch.testing.assert_close(terms["loss_ce"], expected)
    (grad,) = torch.autograd.grad(terms["loss_ce"], logits, retain_graph=True)
    assert bool((grad[~keep] == 0).all()) and bool((grad[keep] != 0).any())
    others = [k for k in terms if k != "loss_ce"]
    assert others
    for k in others:
        torch.testing.assert_close(terms[k], terms_all_labelled[k])
        (g,) = torch.autograd.grad(terms[k], logits, retain_graph=True, allow_unused=True)
        if g is not None and k == "loss_kd":
            assert bool((g[~keep] != 0).any())  # the soft term uses the unlabelled rows


def test_response_kd_skips_unlabelled_rows_in_ce_only():
    m = ResponseKD(student=MLP(), teacher=ConvNet1D(width=8), num_classes=10).train()
    _check_label_and_distillation_terms(m, *unlabelled_batch())


def test_feature_method_fitnet_skips_unlabelled_rows_in_ce_only():
    m = FitNet(student=ConvNet1D(width=16), teacher=ConvNet1D(width=32), student_layers=["relu2"],
               teacher_layers=["relu2"], stage1_epochs=0, input_shape=[1, 40], num_classes=10,
               ce_weight=0.3, kd_weight=0.7).train()
    x, y, y_true, idx = unlabelled_batch()
    _check_label_and_distillation_terms(m, x, y, y_true, idx)
    # the hint term reaches the student through the unlabelled rows too
    only_unlabelled = torch.full_like(y, UNLABELLED)
    logits, terms, _ = m.compute_losses(x, only_unlabelled, idx)
    assert terms["loss_ce"].item() == 0.0
    terms["loss_hint"].backward()
    assert m.student.conv1.weight.grad.abs().sum() > 0


def test_a_batch_without_labelled_rows_has_zero_label_terms():
    m = ResponseKD(student=MLP(), teacher=ConvNet1D(width=8), num_classes=10).train()
    x, _, _, idx = unlabelled_batch()
    loss = m.training_step((x, torch.full((8,), UNLABELLED), idx), 0)
    assert torch.isfinite(loss)
    logits, terms, _ = m.compute_losses(x, torch.full((8,), UNLABELLED), idx)
    assert terms["loss_ce"].item() == 0.0 and terms["loss_kd"].item() > 0


def test_dkd_splits_unlabelled_rows_at_the_teachers_class():
    m = DecoupledKD(student=MLP(), teacher=ConvNet1D(width=8), num_classes=10, warmup_epochs=0).train()
    x, y, y_true, idx = unlabelled_batch()
    logits, terms, _ = m.compute_losses(x, y, idx)
    with torch.no_grad():
        z_t = m.teacher(x)
    split = torch.where(y == UNLABELLED, z_t.argmax(-1), y)
    tckd, nckd = dkd_terms(logits, z_t, split, m.temperature)
    torch.testing.assert_close(terms["loss_tckd"], m.target_weight * tckd)
    torch.testing.assert_close(terms["loss_nckd"], m.non_target_weight * nckd)
    keep = y != UNLABELLED
    torch.testing.assert_close(terms["loss_ce"], F.cross_entropy(logits[keep], y[keep]))


def test_crd_class_aware_negatives_treat_unlabelled_as_unknown_class():
    bank = CRDMemoryBank(num_data=8, dim=4)
    labels = torch.tensor([0, 0, 1, 1, UNLABELLED, UNLABELLED, 0, 1])
    bank.set_negative_pool(torch.arange(8), labels)
    g = torch.Generator().manual_seed(0)
    anchors = torch.tensor([0, 4])  # a labelled anchor of class 0 and an unlabelled one
    neg = bank.sample_negatives(anchors, 200, g, targets=labels[anchors])
    assert set(neg[0].tolist()) == {2, 3, 4, 5, 7}  # other classes and the unlabelled ones
    assert set(neg[1].tolist()) == {0, 1, 2, 3, 5, 6, 7}  # anything but itself


def test_training_accuracy_counts_labelled_rows_only():
    log = TermLog()
    logits = torch.eye(4) * 5  # predicts 0, 1, 2, 3
    log.record(logits, torch.tensor([0, 1, UNLABELLED, UNLABELLED]), {"loss": torch.tensor(1.0)})
    log.record(logits, torch.tensor([0, 3, UNLABELLED, 3]), {"loss": torch.tensor(1.0)})
    assert log.means()["train/acc"].item() == pytest.approx(4 / 5)
    empty = TermLog()
    empty.record(logits, torch.full((4,), UNLABELLED), {"loss": torch.tensor(1.0)})
    assert empty.means()["train/acc"].item() == 0.0


# ---- MutualDistillation ----------------------------------------------------------------------
def test_mutual_losses_use_q_on_unlabelled_rows_and_labels_on_labelled_rows_only():
    _, y, _, _ = unlabelled_batch()
    keep = y != UNLABELLED
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 10, generator=g, requires_grad=True)
    r = torch.rand(2, 8, 10, generator=g, requires_grad=True)
    lam = torch.tensor([0.7, 1.3], requires_grad=True)
    q = rule_regularized_teacher(logits.detach(), r.detach(), lam.detach(), 6.0).exp()
    # student (Eq. 3): CE over labelled rows, softCE(q, p) over every row
    loss, ce, soft = mutual_student_loss(logits, y, q, 0.4)
    torch.testing.assert_close(ce, F.cross_entropy(logits[keep], y[keep]))
    torch.testing.assert_close(soft, -(q * F.log_softmax(logits, -1)).sum(-1).mean())
    (g_ce,) = torch.autograd.grad(ce, logits, retain_graph=True)
    (g_soft,) = torch.autograd.grad(soft, logits)
    assert bool((g_ce[~keep] == 0).all()) and bool((g_soft[~keep] != 0).all())
    # lambda (Eq. 6): the likelihood of the labels, i.e. of the labelled rows only
    full = rule_weight_loss(logits, r, lam, y, 6.0)
    sub = rule_weight_loss(logits[keep], r[:, keep], lam, y[keep], 6.0)
    torch.testing.assert_close(full, sub)
    torch.testing.assert_close(torch.autograd.grad(full, lam)[0], torch.autograd.grad(sub, lam)[0])
    assert rule_weight_loss(logits, r, lam, torch.full((8,), UNLABELLED), 6.0).item() == 0.0
    # knowledge (Eq. 5): label part over labelled rows, E_q part over every row
    pi_prime = 0.3
    phi = knowledge_loss(r, y, q, pi_prime)
    label_part = knowledge_loss(r[:, keep], y[keep], q[keep], 0.0)
    q_part = knowledge_loss(r, y.clamp_min(0), q, 1.0)  # the labels have weight 0 at pi' = 1
    torch.testing.assert_close(phi, (1 - pi_prime) * label_part + pi_prime * q_part)
    (g_r,) = torch.autograd.grad(phi, r)
    expected = -pi_prime * q / 8  # unlabelled rows: only the E_q part, mean over all 8 rows
    torch.testing.assert_close(g_r[:, ~keep], expected[~keep].expand(2, -1, -1))


class _RecordingRule(MNIST1DTemplateRule):
    def fit_to_labelled(self, x, y):
        self.fitted_on = y.clone()
        super().fit_to_labelled(x, y)


def test_mutual_fit_with_unlabelled_data_fits_the_rules_on_the_labelled_examples_only():
    pl.seed_everything(0)
    rule = _RecordingRule(sharpness=None, dilation_step=3, shift_step=4)
    m = MutualDistillation(rules=[rule], student=MLP(), num_classes=10, pi_rate=0.0,
                           learn_phi=False)
    dm = DistillDataModule("mnist1d", batch_size=50, train_subset=20, unlabelled=80)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1, limit_val_batches=0)
    trainer.fit(m, dm)
    assert len(rule.fitted_on) == 20 and bool((rule.fitted_on >= 0).all())
    assert trainer.global_step == 2


def test_mutual_step_on_an_unlabelled_batch_leaves_lambda_and_trains_the_student(monkeypatch):
    rule = MNIST1DTemplateRule(sharpness=50.0, dilation_step=3, shift_step=4)
    m = MutualDistillation(rules=[rule], student=MLP(), num_classes=10, learn_phi=False)
    monkeypatch.setattr(m, "current_pi", lambda batch_idx: 0.9)  # imitating q
    dm = DistillDataModule("mnist1d", batch_size=50, train_subset=20, unlabelled=80)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1, limit_val_batches=0, limit_train_batches=0)
    trainer.fit(m, dm)  # attaches the optimizers without training
    dm.setup("fit")
    ds = dm.train_dataset
    positions = torch.from_numpy(np.nonzero(np.isin(ds.indices.numpy(), dm.unlabelled_indices))[0])
    x, y, idx = ds.get_batch(positions[:16])
    assert bool((y == UNLABELLED).all())
    lam0 = m.rule_weights.detach().clone()
    w0 = [p.detach().clone() for p in m.student.parameters()]
    m.minibatch_step((x, y, idx), 0)
    assert torch.equal(m.rule_weights.detach(), lam0)  # Eq. 6 needs labels: no move
    # the soft term on q moved the student
    assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(m.student.parameters(), w0))


# ---- the student alone and the CLI -------------------------------------------------------------
def test_supervised_warns_that_unlabelled_rows_contribute_nothing():
    m = Supervised(student=MLP(), num_classes=10)
    dm = DistillDataModule("mnist1d", batch_size=50, train_subset=20, unlabelled=30)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1, limit_val_batches=0, limit_train_batches=1)
    with pytest.warns(UserWarning, match="30 unlabelled examples .* contribute no loss term"):
        trainer.fit(m, dm)
