"""CRD as a method: its terms, negatives and bank update, the bank across a resume and under DDP."""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from kd_lightning.data import DistillDataModule
from kd_lightning.methods import CRD
from tests.methods.test_auxiliary_modules import _batch, _ddp, _make, _nets, _trainer


def _nce_by_hand(logits: torch.Tensor, log_z: torch.Tensor, num_candidates: int) -> torch.Tensor:
    logits = logits.double()
    k = logits.shape[1] - 1
    p = torch.exp(logits - log_z.double())
    h = p / (p + k / num_candidates)
    return -(torch.log(h[:, 0]).sum() + torch.log(1 - h[:, 1:]).sum()) / logits.shape[0]


def test_crd_terms_negatives_and_bank_update():
    m = _make(CRD, transfer_weight=0.8)
    x, y, idx = _batch()
    memory_s, memory_t = m.bank.memory_s.clone(), m.bank.memory_t.clone()
    losses = m.compute_losses(x, y, idx)
    # by hand: embeddings of the fc inputs, the negatives the seeded sampler draws, the scores
    v_s = m.embed_s(m.student.forward_features(x))
    v_t = m.embed_t(m.teacher.forward_features(x))
    negatives = m.bank.sample_negatives(idx, 7, torch.Generator().manual_seed(0), targets=y)
    labels = torch.arange(60) % 10
    assert (labels[negatives] != y[:, None]).all()  # other classes only
    assert all(len(set(row.tolist())) == 7 for row in negatives)  # without replacement
    contrast = torch.cat([idx[:, None], negatives], 1)
    logits_s = (v_s.double() @ memory_t.double().t()).gather(1, contrast) / 0.07
    logits_t = (v_t.double() @ memory_s.double().t()).gather(1, contrast) / 0.07
    log_z = [torch.log(torch.exp(lg).mean()) + math.log(60) for lg in (logits_s, logits_t)]
    assert torch.allclose(m.bank.log_z.double(), torch.stack(log_z), atol=1e-4)
    crd = _nce_by_hand(logits_s, log_z[0], 60) + _nce_by_hand(logits_t, log_z[1], 60)
    assert torch.allclose(losses.terms["loss_crd"].double(), 0.8 * crd, rtol=1e-4)
    assert torch.allclose(losses.terms["loss_ce"], F.cross_entropy(m.student(x), y))
    # the bank changes only after the backward pass, by momentum 0.5, renormalised
    assert torch.equal(m.bank.memory_s, memory_s)
    sum(losses.terms.values()).backward()
    m.apply_bank_update()
    assert torch.allclose(m.bank.memory_s[idx], F.normalize(0.5 * memory_s[idx] + 0.5 * v_s.detach()))
    assert torch.allclose(m.bank.memory_t[idx], F.normalize(0.5 * memory_t[idx] + 0.5 * v_t.detach()))
    others = torch.ones(60, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(m.bank.memory_s[others], memory_s[others])
    assert m.negative_draws == 1  # the next step draws from a newly seeded sampler


class _BankAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.bank = {k: v.clone() for k, v in pl_module.bank.state_dict().items()}
        self.draws = pl_module.negative_draws


def test_crd_bank_survives_checkpoint_and_resume(tmp_path):
    def fit(max_epochs, ckpt=None, callbacks=()):
        student, teacher = _nets()
        m = CRD(student=student, teacher=teacher, num_negatives=512)
        trainer = _trainer(max_epochs=max_epochs, limit_train_batches=2, enable_checkpointing=True,
                           default_root_dir=tmp_path, callbacks=list(callbacks))
        trainer.fit(m, DistillDataModule("mnist1d", batch_size=25, train_subset=100), ckpt_path=ckpt)
        return m, trainer

    with pytest.warns(UserWarning, match=r"num_negatives=512 but each training example has only 90 "
                                         r"candidate negatives \(100 examples in the pool"):
        first, trainer = fit(1)
    assert first.bank.num_data == 4000  # every row of the training source
    assert not torch.isnan(first.bank.log_z).any() and first.negative_draws == 2
    ckpt = trainer.checkpoint_callback.best_model_path
    saved = torch.load(ckpt, weights_only=False)
    assert {"bank.memory_s", "bank.memory_t", "bank.log_z"} <= set(saved["state_dict"])
    assert "bank.pool" not in saved["state_dict"]  # derived from the data, set again at the start
    spy = _BankAtStart()
    resumed, _ = fit(2, ckpt, [spy])
    for key, value in first.bank.state_dict().items():
        assert torch.equal(spy.bank[key], value), key
    assert spy.draws == 2 and resumed.negative_draws == 4
    assert not torch.equal(resumed.bank.memory_s, first.bank.memory_s)  # and it kept learning
    assert torch.equal(resumed.bank.log_z, first.bank.log_z)  # the constants are estimated once


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_crd_ranks_keep_identical_banks_without_broadcasting_them(mnist1d_teacher, tmp_path):
    """Buffers are not broadcast (broadcast_buffers=False), so equal banks on both ranks come from
    the gathered, identical updates; the weights are equal too."""
    no_broadcast = json.dumps({"class_path": "pytorch_lightning.strategies.DDPStrategy",
                               "init_args": {"broadcast_buffers": False}})
    r0 = _ddp("crd.yaml", mnist1d_teacher, tmp_path, no_broadcast, "--trainer.max_epochs", "2")
    assert r0["broadcast_buffers"] is False
    assert r0["steps"] == 6 and "bank.memory_s" in r0["keys"]
