"""MutualDistillation (Hu et al., ACL 2016) as a method: the three updates, the rule cache, the CLI, DDP.
(Its loss functions: tests/losses/test_mutual.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.data.dataset import IndexedTensorDataset, batch_collate
from kd_lightning.data.sources import load_mnist1d
from kd_lightning.methods import MutualDistillation
from kd_lightning.models import MLP, ConvNet1D
from kd_lightning.rules import MNIST1DLearnableTemplateRule, MNIST1DTemplateRule, Rule
from tests.conftest import CONFIGS, TINY, run_cli, run_cli_error, run_ddp, tb_scalars


K = 4  # classes of the synthetic problems


# ---- synthetic problems for the updates ---------------------------------------------------
class CodeRule(Rule):
    """Reads the class code hidden in the last input feature: r = onehot(code + shift)."""

    def __init__(self, shift: int = 0, num_classes: int = K) -> None:
        super().__init__()
        self.shift, self.k = shift, num_classes

    def forward(self, x):
        code = x[:, -1].round().long().clamp(0, self.k - 1)
        return F.one_hot((code + self.shift) % self.k, self.k).float()


class BlindStudent(nn.Module):
    """A linear classifier that does not see the code feature."""

    def __init__(self, d: int = 2, k: int = K) -> None:
        super().__init__()
        self.fc = nn.Linear(d, k)

    def forward(self, x):
        return self.fc(x[:, :-1])


def synthetic(n: int, seed: int = 0):
    """Overlapping Gaussian classes in 2-D (a linear model gets about 60%), plus the exact code."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    x = centers[y] + 0.9 * torch.randn(n, 2, generator=g)
    return torch.cat([x, y[:, None].float()], 1), y


def _loader(x, y, batch_size=50, shuffle=True):
    return DataLoader(IndexedTensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      collate_fn=batch_collate)


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


def _fit_synthetic(rule: Rule, epochs: int = 6, **kw) -> MutualDistillation:
    pl.seed_everything(0)
    x, y = synthetic(600)
    model = MutualDistillation(rules=[rule], student=BlindStudent(), num_classes=K, lambdas=0.5,
                               lambda_lr=0.05, optimizer=lambda p: torch.optim.Adam(p, lr=0.05), **kw)
    _trainer(max_epochs=epochs).fit(model, _loader(x, y))
    return model


def test_lambda_grows_for_an_always_right_rule():
    model = _fit_synthetic(CodeRule(shift=0))
    assert float(model.rule_weights) > 1.0  # from 0.5, still growing (q(y) < 1 for this student)


def test_lambda_falls_to_zero_for_a_wrong_rule():
    model = _fit_synthetic(CodeRule(shift=1))
    assert float(model.rule_weights) < 0.05  # from 0.5, projected onto lambda >= 0
    assert float(model.rule_weights) >= 0.0


def test_lambda_follows_eq6_as_written_by_default_and_the_log_form_on_request():
    """A rule right on 3 of 4 examples (the code is shifted on every 4th): the mean of q(y)
    (Eq. 6 as Hu et al. write it, the default) keeps raising lambda, while the mean log q(y),
    which the contradicted examples hold down, settles far lower."""
    pl.seed_everything(0)
    x, y = synthetic(600)
    x[3::4, -1] = ((y[3::4] + 1) % K).float()
    final = {}
    for objective in (None, "mean_log_q"):
        pl.seed_everything(0)
        kw = {} if objective is None else {"lambda_objective": objective}
        model = MutualDistillation(rules=[CodeRule()], student=BlindStudent(), num_classes=K,
                                   lambdas=0.5, lambda_lr=0.05, C=2.0,
                                   optimizer=lambda p: torch.optim.Adam(p, lr=0.05), **kw)
        assert model.lambda_objective == (objective or "mean_q")
        _trainer(max_epochs=6).fit(model, _loader(x, y))
        final[objective] = float(model.rule_weights)
    assert final[None] > 1.8 and final["mean_log_q"] < 1.2, final  # measured: 2.29 and 0.92


def test_hand_set_lambda_stays_and_student_learns_the_rule_through_q():
    right = _fit_synthetic(CodeRule(shift=0), learn_lambda=False)
    assert float(right.rule_weights) == 0.5
    assert right.optimizer_roles() == ["theta"]


def test_phi_update_improves_rule_agreement_on_held_out_data():
    """Eq. 5 with pi' = 0 on MNIST-1D: templates learned from random noise agree more with the
    labels of examples they were never trained on."""
    splits = load_mnist1d("data")
    x_held, y_held = splits.x_test, splits.y_test
    pl.seed_everything(0)
    rule = MNIST1DLearnableTemplateRule(templates="random", seed=0, dilation_step=2, shift_step=2)

    def held_out_acc():
        with torch.no_grad():
            return float((rule(x_held).argmax(-1) == y_held).float().mean())

    before = held_out_acc()
    model = MutualDistillation(rules=[rule], student=MLP(), num_classes=10, pi_prime=0.0,
                               phi_lr=0.02, learn_lambda=False, lambdas=0.0)
    dm = DistillDataModule("mnist1d", batch_size=100, train_subset=2000)
    _trainer(max_steps=100, max_epochs=-1).fit(model, dm)
    after = held_out_acc()
    assert after > before + 0.08, (before, after)


def test_no_phi_optimizer_for_fixed_rules_and_warnings():
    with pytest.warns(UserWarning, match="no rule has trainable parameters"):
        m = MutualDistillation(rules=[CodeRule()], student=BlindStudent(), num_classes=K)
    assert m.optimizer_roles() == ["theta", "lambda"]
    with pytest.warns(UserWarning, match=r"learn_phi is false, so the parameters \(phi\) of rule 0 "
                                         r"\(MNIST1DLearnableTemplateRule\) stay frozen"):
        m = MutualDistillation(rules=[MNIST1DLearnableTemplateRule()], student=MLP(), num_classes=10,
                               learn_phi=False)
    assert all(not p.requires_grad for p in m.rules.parameters())
    assert m.optimizer_roles() == ["theta", "lambda"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(C=-1.0), "C must be a finite number >= 0"),
    (dict(pi_0=1.5), "pi_0 must be in [0, 1]"),
    (dict(pi_prime=-0.1), "pi_prime must be in [0, 1]"),
    (dict(lambdas=[1.0, 2.0]),
     "lambdas has 2 entries ([1.0, 2.0]) but there are 1 rules (rule 0 (CodeRule))"),
    (dict(lambdas=-1.0), "every lambda must be a finite number >= 0"),
    (dict(rules=[]), "needs at least one rule"),
    (dict(phi_objective="f"), "phi_objective must be"),
    (dict(lambda_objective="nll"), "lambda_objective must be 'mean_q'"),
])
def test_bad_arguments_are_reported(kwargs, message):
    args = dict(rules=[CodeRule()], student=BlindStudent(), num_classes=K, learn_phi=False)
    with pytest.raises(KDConfigError) as err:
        MutualDistillation(**{**args, **kwargs})
    assert message in str(err.value)


def test_rule_cache_gives_the_same_student_as_no_cache():
    states = {}
    for cache in (None, False):
        pl.seed_everything(4)
        model = MutualDistillation(rules=[MNIST1DTemplateRule(dilation_step=3)], student=MLP(),
                                   num_classes=10, rule_cache=cache, learn_phi=False)
        _trainer(max_epochs=2).fit(model, DistillDataModule("mnist1d", batch_size=50, train_subset=200))
        assert float(model.rule_weights) != 1.0
        states[cache] = {**model.student.state_dict(), "lambda": model.rule_weights.detach().clone()}
    for key, value in states[None].items():
        assert torch.allclose(value, states[False][key], atol=1e-5), key


def test_rule_cache_is_used_for_fixed_rules_only():
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            seen.setdefault("cache", module.rule_cache_store.active)

    for rule, cached in ((MNIST1DTemplateRule(dilation_step=3), True),
                         (MNIST1DLearnableTemplateRule(dilation_step=3), False)):
        seen.clear()
        model = MutualDistillation(rules=[rule], student=MLP(), num_classes=10)
        _trainer(max_steps=1, callbacks=[Spy()]).fit(model, DistillDataModule("mnist1d", train_subset=100))
        assert seen["cache"] is cached


def test_learnable_rules_cache_their_example_features_with_the_same_result():
    """A learnable rule cannot be cached whole, but its x-only part (the window norms) can: the
    feature cache is used for it, and the run is bit-identical to one that recomputes them."""
    seen, states = {}, {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            seen[module.rule_cache] = (module.rule_cache_store.active, module.rule_feature_store.active)

    for cache in (None, False):
        pl.seed_everything(4)
        model = MutualDistillation(rules=[MNIST1DLearnableTemplateRule(dilation_step=3, sharpness=50.0)],
                                   student=MLP(), num_classes=10, rule_cache=cache)
        _trainer(max_epochs=2, callbacks=[Spy()]).fit(
            model, DistillDataModule("mnist1d", batch_size=50, train_subset=200))
        states[cache] = {k: v.clone() for k, v in model.state_dict().items()}
    assert seen == {None: (False, True), False: (False, False)}
    assert not model.rule_feature_store.active  # released at the end of training
    moved = states[None]["rules.0.templates"] != MNIST1DLearnableTemplateRule(dilation_step=3).templates
    assert bool(moved.any())  # phi was learned
    for key, value in states[None].items():
        assert torch.equal(value, states[False][key]), key


def test_network_teacher_joins_as_in_response_kd():
    pl.seed_everything(0)
    model = MutualDistillation(rules=[MNIST1DTemplateRule(dilation_step=3)], student=MLP(),
                               teacher=ConvNet1D(width=8), num_classes=10, ce_weight=0.5, kd_weight=0.5)
    trainer = _trainer(max_steps=3, max_epochs=-1, limit_val_batches=1)
    trainer.fit(model, DistillDataModule("mnist1d", train_subset=100, batch_size=50))
    assert math.isfinite(float(trainer.callback_metrics["train/loss_kd"]))
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert {id(p) for p in trainer.optimizers[0].param_groups[0]["params"]} == \
        {id(p) for p in model.student.parameters()}


# ---- through the CLI ---------------------------------------------------------------------
def _mutual_args(config: str, *extra) -> list:
    return ["fit", "--config", CONFIGS / f"mnist1d/{config}.yaml", *TINY, "--data.batch_size", "50",
            "--data.train_subset", "100", "--test_after_fit", "false", *extra]


def test_fit_logs_lambda_pi_and_q_and_rule_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(_mutual_args("mutual_learnable", "--test_after_fit", "true"))
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    for key in ("train/lambda_0", "train/pi", "train/pi_prime", "train/loss_phi", "train/loss_lambda",
                "train/loss_q", "train/acc_q", "val/acc", "val/acc_q", "val/acc_rule", "test/acc",
                "test/acc_q", "test/acc_rule"):
        assert key in scalars, key
    assert len(scalars["train/lambda_0"]) == 1  # once per epoch, not per step
    assert scalars["train/pi"][-1] == pytest.approx(1 - 0.95 ** 0.5)  # last batch: t = 1/2 epoch
    assert len(cli.trainer.optimizers) == 3
    assert cli.trainer.global_step == 2  # only the student's steps are counted
    assert "rules" not in cli.model.hparams


def test_checkpoint_and_resume_restore_all_three_optimisers_lambda_and_phi(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(_mutual_args("mutual_learnable", "--model.init_args.phi_lr", "0.05"))
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert len(ckpt["optimizer_states"]) == 3
    assert [len(s["state"]) for s in ckpt["optimizer_states"]] == [6, 2, 1]  # MLP, phi, lambda
    saved_lambda = ckpt["state_dict"]["rule_weights"]
    saved_phi = ckpt["state_dict"]["rules.0.templates"]
    assert not torch.equal(saved_phi, MNIST1DLearnableTemplateRule().templates)  # phi was learned
    assert float(saved_lambda) != 1.0  # and lambda

    # restore without training further: everything equals the checkpoint
    cli2 = run_cli(_mutual_args("mutual_learnable", "--ckpt_path", last))
    model = cli2.model
    assert torch.equal(model.rule_weights.detach(), saved_lambda)
    assert torch.equal(model.rules[0].templates.detach(), saved_phi)
    for opt, state in zip(cli2.trainer.optimizers, ckpt["optimizer_states"]):
        restored = opt.state_dict()["state"]
        assert restored.keys() == state["state"].keys()
        for key in state["state"]:
            for name, value in state["state"][key].items():
                assert torch.equal(restored[key][name], value), (key, name)

    # and training continues from there: 2 more epochs of 2 student steps each
    cli3 = run_cli(_mutual_args("mutual_learnable", "--ckpt_path", last, "--trainer.max_epochs", "3"))
    assert cli3.trainer.current_epoch == 3 and cli3.trainer.global_step == 6
    lam_state = cli3.trainer.optimizers[2].state_dict()["state"][0]
    assert int(lam_state["step"]) == 6  # lambda took one step per batch, across the resume
    lr = cli3.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.01 * (1 + math.cos(math.pi * 3 / 150)) / 2)  # cosine, per epoch


BAD = [
    (["--model.init_args.C", "-1"], "C must be a finite number >= 0"),
    (["--model.init_args.pi_0", "1.2"], "pi_0 must be in [0, 1]"),
    (["--model.init_args.lambdas", "[1.0, 0.5]"], "lambdas has 2 entries"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m[:20] for _, m in BAD])
def test_bad_cli_input_gives_one_paragraph_error(extra, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = run_cli_error(_mutual_args("mutual_fixed", *extra), capsys)
    assert message in err
    assert not list(tmp_path.rglob("*.ckpt"))


class WrongShapeRule(Rule):
    def forward(self, x):
        return torch.full((x.shape[0], 3), 1 / 3)


class OutOfRangeRule(Rule):
    def forward(self, x):
        return torch.full((x.shape[0], 10), 2.0)


@pytest.mark.parametrize("rule, message", [
    (WrongShapeRule,
     "rule 0 (WrongShapeRule) returned r of shape (2, 3); expected [batch, num_classes] = (2, 10)"),
    (OutOfRangeRule, "rule 0 (OutOfRangeRule) returned r of shape (2, 10) with values outside [0, 1]"),
])
def test_broken_rule_is_reported_before_training(rule, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", CONFIGS / "mnist1d/mutual_fixed.yaml", *TINY,
            "--model.init_args.rules", f"[{{class_path: {rule.__module__}.{rule.__name__}}}]"]
    err = run_cli_error(args, capsys)
    assert message in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_bf16_mixed_short_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(_mutual_args("mutual_learnable", "--trainer.precision", "bf16-mixed",
                               "--test_after_fit", "true"))
    metrics = cli.trainer.callback_metrics
    for key in ("test/acc", "test/acc_q", "test/acc_rule"):
        assert 0.0 <= float(metrics[key]) <= 1.0
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    for key in ("train/loss", "train/loss_phi", "train/lambda_0"):
        assert all(map(math.isfinite, scalars[key])), key
    assert cli.model.rule_weights.dtype == torch.float32


DUMP_STATE = '''
import json
from pytorch_lightning import Callback

class DumpState(Callback):
    def on_train_end(self, trainer, m):
        with open(f"rank{trainer.global_rank}.json", "w") as f:
            json.dump({"lambda": m.rule_weights.tolist(), "phi": m.rules[0].templates.tolist(),
                       "theta": m.student.fc.weight.tolist(), "step": trainer.global_step}, f)
'''


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_keeps_theta_phi_and_lambda_identical_on_every_process(tmp_path):
    (r0, r1), _ = run_ddp(["fit", "--config", CONFIGS / "mnist1d/mutual_learnable.yaml", *TINY,
                           "--trainer.limit_train_batches", "3", "--test_after_fit", "false"], tmp_path,
                          DUMP_STATE, strategy="ddp_find_unused_parameters_true", timeout=240)
    assert r0 == r1 and r0["step"] == 3 and r0["lambda"] != [1.0]
