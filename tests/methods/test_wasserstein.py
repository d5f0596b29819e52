"""Wasserstein-ball KD as a method: Eq. 2 through both networks, the training step through the
input gradient, bad arguments, non-finite gradients, the CLI and DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.func import functional_call

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.losses import kd_loss
from kd_lightning.methods import NonFiniteGradientError, ResponseKD, WassersteinKD
from kd_lightning.models import MLP, ConvNet1D
from tests.conftest import CONFIGS, TINY, run_cli, run_cli_error, run_ddp, tb_scalars


def _wkd(eps: float, **kw) -> WassersteinKD:
    torch.manual_seed(0)
    teacher = MLP(input_dim=40, hidden_dims=[16], num_classes=10)
    torch.manual_seed(1)
    student = MLP(input_dim=40, hidden_dims=[12], num_classes=10)
    # the student-only variant with a label term, whose eps = 0 limit is ResponseKD(0.1, 0.9)
    kw = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "penalty_through_teacher": False, **kw}
    return WassersteinKD(student=student, teacher=teacher, eps=eps, num_classes=10, **kw)


def test_wasserstein_kd_default_is_eq2_through_both_networks():
    """By default (Kong et al.'s Eq. 2): no CE, T = 1, and the penalty differentiates
    l(o_S(x), o_T(x)) through the teacher too (its weights get no gradient)."""
    torch.manual_seed(0)
    teacher = MLP(input_dim=40, hidden_dims=[16], num_classes=10)
    torch.manual_seed(1)
    student = MLP(input_dim=40, hidden_dims=[12], num_classes=10)
    m = WassersteinKD(student=student, teacher=teacher, eps=0.5, num_classes=10)
    assert (m.temperature, m.ce_weight, m.kd_weight, m.teacher_cache) == (1.0, 0.0, 1.0, False)
    x, y, idx = _batch()
    _, terms, logged = m.compute_losses(x, y, idx)
    assert set(terms) == {"loss_w"}
    xx = x.clone().requires_grad_(True)
    per = kd_loss(student(xx), teacher(xx), 1.0, reduction="none", detach_teacher=False)
    gx = torch.autograd.grad(per.sum(), xx)[0]
    assert torch.allclose(logged["grad_norm"], gx.flatten(1).norm(dim=1).mean(), rtol=1e-5)
    only_student = _wkd(0.5, temperature=1.0, ce_weight=0.0, kd_weight=1.0)
    _, _, logged_s = only_student.compute_losses(x, y, idx)
    assert not torch.allclose(logged["grad_norm"], logged_s["grad_norm"], rtol=1e-2)
    terms["loss_w"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def _batch(n: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 1, 40, generator=g) if dtype.is_floating_point else \
        torch.randint(0, 7, (n, 1, 40), generator=g, dtype=dtype)
    return x, torch.arange(n) % 10, torch.arange(n)


def test_wasserstein_kd_with_eps_zero_is_response_kd():
    batch = _batch()
    w = _wkd(0.0)
    r = ResponseKD(student=w.student, teacher=w.teacher, temperature=4.0, ce_weight=0.1, kd_weight=0.9, num_classes=10)
    lw, lr = w.training_step(batch, 0), r.training_step(batch, 0)
    assert lw.item() == pytest.approx(lr.item(), rel=1e-6)
    gw = torch.autograd.grad(lw, list(w.student.parameters()))
    gr = torch.autograd.grad(lr, list(r.student.parameters()))
    for a, b in zip(gw, gr):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # ResponseKD's step: no input gradient is taken, so no grad_norm, and the input stays a leaf
    x, y, idx = batch
    assert "grad_norm" not in w.compute_losses(x, y, idx).logged and not x.requires_grad


@pytest.mark.parametrize("eps,cached", [(0.0, True), (0.5, False)])
def test_teacher_cache_only_where_the_penalty_does_not_run_the_teacher(eps, cached):
    """At eps = 0 the step is ResponseKD's, so the teacher's logits come from its per-example cache
    (as ResponseKD's do); at eps > 0 Eq. (2) differentiates through the teacher on every step."""
    pl.seed_everything(0)
    m = WassersteinKD(student=MLP(), teacher=ConvNet1D(width=16), eps=eps,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    trainer.fit(m, DistillDataModule("mnist1d", batch_size=50, train_subset=100))
    assert m.teacher_cache_used is cached


def test_wasserstein_kd_step_trains_through_the_input_gradient():
    """The method's parameter gradient = that of eps=0 + kd_weight * eps * d/dtheta mean||grad_x l||,
    the last term computed independently with torch.func (grad of grad)."""
    eps = 0.5
    batch = _batch()
    x, _, idx = batch
    m0, m1 = _wkd(0.0), _wkd(eps)
    params = list(m1.student.parameters())
    g1 = torch.autograd.grad(m1.training_step(batch, 0), params)
    g0 = torch.autograd.grad(m0.training_step(batch, 0), list(m0.student.parameters()))
    z_t = m1.teacher_logits(x, idx)
    names = [n for n, _ in m1.student.named_parameters()]

    def penalty(ps):
        def summed(xx):
            return kd_loss(functional_call(m1.student, ps, (xx,)), z_t, 4.0, reduction="none").sum()
        gx = torch.func.grad(summed)(x)
        return gx.flatten(1).norm(dim=1).mean()

    dp = torch.func.grad(penalty)({n: p.detach() for n, p in zip(names, params)})
    for name, a, b in zip(names, g1, g0):
        expected = b + 0.9 * eps * dp[name]
        assert torch.allclose(a, expected, rtol=1e-4, atol=1e-6), name
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(g1, g0))


def test_integer_inputs_are_converted_and_the_batch_is_untouched():
    m = _wkd(0.3)
    x, y, idx = _batch(dtype=torch.int64)
    before = x.clone()
    loss = m.training_step((x, y, idx), 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert x.dtype == torch.int64 and torch.equal(x, before) and not x.requires_grad and x.grad is None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.student.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())
    xf = before.float()
    m.training_step((xf, y, idx), 0).backward()
    assert not xf.requires_grad and xf.grad is None  # float batches too


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


@pytest.mark.parametrize("batched", [True, False])
def test_training_leaves_the_data_set_unchanged(batched):
    dm = DistillDataModule("mnist1d", batch_size=50, train_subset=100, batched=batched)
    splits = dm.splits()
    before = splits.x_train.clone()
    model = _wkd(1.0, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    _trainer(max_steps=4, max_epochs=-1).fit(model, dm)
    assert model.global_step == 4
    assert torch.equal(splits.x_train, before)
    assert dm.train_dataset.x is splits.x_train
    assert not splits.x_train.requires_grad and splits.x_train.grad is None


def test_wasserstein_bad_arguments():
    for kw, msg in [({"eps": -0.1}, "eps must be >= 0"), ({"norm_p": 0.5}, "norm_p must be >= 1"),
                    ({"temperature": 0.0}, "temperature must be > 0"),
                    ({"ce_weight": -1.0}, "ce_weight must be >= 0")]:
        with pytest.raises(KDConfigError, match=msg):
            _wkd(**{"eps": 0.1, **kw})
    with pytest.raises(KDConfigError, match="no teacher was given"):
        WassersteinKD(student=MLP())


def test_wasserstein_non_finite_gradient_is_named():
    m = _wkd(0.1)
    x, y, idx = _batch()
    x[2, 0, 5] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"term 'grad_norm'.*is nan at global step 0"):
        m.training_step((x, y, idx), 0)


# ---- through the CLI -----------------------------------------------------------------------
def _args(config: str, teacher: Path, *extra) -> list:
    return ["fit", "--config", CONFIGS / config, *TINY, "--model.init_args.teacher_checkpoint", teacher,
            *extra]


TERMS = {"mnist1d/wasserstein.yaml": ["loss", "loss_kd", "loss_w", "grad_norm"],
         "mnist1d/relation.yaml": ["loss", "loss_ce", "loss_rkd_d", "loss_rkd_a"]}


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("config", list(TERMS))
def test_cli_runs_log_every_term(config, precision, mnist1d_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(_args(config, mnist1d_teacher, "--trainer.precision", precision,
                        "--trainer.max_epochs", "2"))
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    for term in TERMS[config]:
        values = scalars[f"train/{term}"]
        assert values and all(map(math.isfinite, values)), term
    if "wasserstein" in config:
        assert all(v > 0 for v in scalars["train/grad_norm"])
    assert 0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1


def test_cli_bad_eps_is_one_paragraph(mnist1d_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = run_cli_error(_args("mnist1d/wasserstein.yaml", mnist1d_teacher, "--model.init_args.eps", "-1"),
                        capsys)
    assert "eps must be >= 0, got -1.0" in err
    assert not list(tmp_path.rglob("*.ckpt"))


POISON = '''
import torch
from pytorch_lightning import Callback


class Poison(Callback):
    """Makes the student's first layer nan just before global step 5 (epoch 2, batch 1)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:
            with torch.no_grad():
                pl_module.student.fc1.weight.fill_(float("nan"))
'''


def test_cli_non_finite_input_gradient_stops_and_keeps_last_good_checkpoint(
        mnist1d_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "poison_cb.py").write_text(POISON)
    monkeypatch.syspath_prepend(str(tmp_path))
    err = run_cli_error(_args("mnist1d/wasserstein.yaml", mnist1d_teacher, "--trainer.max_epochs", "4",
                              "--trainer.callbacks+=poison_cb.Poison"), capsys)
    assert "term 'grad_norm'" in err and "global step 5 (epoch 2)" in err
    assert "last good checkpoint is kept" in err
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts  # the checkpoints of epochs 1-2 are there ...
    for path in ckpts:  # ... and none was written from the nan step or after it
        ckpt = torch.load(path, weights_only=False)
        assert ckpt["global_step"] <= 4
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# ---- DDP: two CPU processes, through the console script --------------------------------------
HASH_CALLBACK = '''
import hashlib, json, os
import torch
from pytorch_lightning import Callback


class DumpWeights(Callback):
    def on_train_end(self, trainer, pl_module):
        h = hashlib.sha1()
        for v in pl_module.student.state_dict().values():
            h.update(v.detach().cpu().numpy().tobytes())
        with open(os.path.join(os.getcwd(), f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"world": trainer.world_size, "student": h.hexdigest(),
                       "steps": trainer.global_step}, f)
'''


def _ddp_run(config: str, teacher: Path, tmp_path: Path) -> None:
    (r0, r1), out = run_ddp(_args(config, teacher, "--data.train_subset", "200",
                                  "--trainer.limit_train_batches", "3", "--data.batch_size", "20"),
                            tmp_path, HASH_CALLBACK, timeout=240)
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 3
    assert r0["student"] == r1["student"]  # the (double-backprop) gradients were all-reduced
    assert "test/acc" in out.stdout


@pytest.mark.ddp
def test_ddp_two_cpu_processes_wasserstein(mnist1d_teacher, tmp_path):
    _ddp_run("mnist1d/wasserstein.yaml", mnist1d_teacher, tmp_path)
