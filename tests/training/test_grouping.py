"""data.batches_per_step: k minibatches per Lightning step, same examples, same math, same student."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.methods import FitNet, MutualDistillation, ResponseKD, Supervised
from kd_lightning.models import MLP, ConvNet1D
from kd_lightning.rules import MNIST1DTemplateRule


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                    devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_groups_hold_the_batches_of_a_plain_loader_in_order(batched, drop_last):
    seen = {}
    for k in (1, 4):
        dm = DistillDataModule("digits", batch_size=64, batches_per_step=k, batched=batched,
                               drop_last=drop_last)
        dm.setup("fit")
        torch.manual_seed(7)  # the shuffle order of both epochs
        batches = []
        for _ in range(2):
            for item in dm.train_dataloader():
                batches.extend(item if k > 1 else [item])
        seen[k] = batches
    n = len(dm.train_dataset)
    assert len(seen[1]) == len(seen[4]) == 2 * (n // 64 if drop_last else -(-n // 64))
    for a, b in zip(seen[1], seen[4]):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def _fit(k: int, method=Supervised, epochs: int = 2, steps: int = -1, **trainer_kw):
    pl.seed_everything(0, verbose=False)
    kw = {}
    if method is ResponseKD:
        kw = dict(teacher=ConvNet1D(width=8), temperature=4.0)
    model = method(student=MLP(), optimizer=partial(torch.optim.Adam, lr=1e-2), **kw,
                   **trainer_kw.pop("model_kw", {}))
    trainer = _trainer(max_epochs=epochs, max_steps=steps, **trainer_kw)
    trainer.fit(model, DistillDataModule("mnist1d", batch_size=100, train_subset=1000,
                                         batches_per_step=k))
    return trainer, model


@pytest.mark.parametrize("case", [
    dict(),
    dict(method=ResponseKD),
    dict(gradient_clip_val=0.05),
    dict(gradient_clip_val=0.01, gradient_clip_algorithm="value"),
    dict(model_kw=dict(lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))),
    dict(model_kw=dict(lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5),
                       lr_scheduler_interval="step")),
    dict(limit_val_batches=1.0, model_kw=dict(lr_scheduler=partial(
        torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max", patience=0, factor=0.5))),
    dict(steps=13),
    dict(steps=10, model_kw=dict(lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))),
    dict(steps=13, model_kw=dict(lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))),
], ids=["ce", "response_kd", "clip_norm", "clip_value", "epoch_scheduler", "step_scheduler", "plateau", "max_steps",
        "max_steps_at_epoch_end", "max_steps_mid_epoch"])
def test_grouped_training_gives_the_same_student_as_one_batch_per_step(case):
    case = dict(case)
    method = case.pop("method", Supervised)
    steps = case.pop("steps", -1)
    results = {}
    for k in (1, 4):
        trainer, model = _fit(k, method=method, steps=steps, **dict(case))
        results[k] = (trainer.global_step, _flat(model.student), trainer.optimizers[0].param_groups[0]["lr"])
    assert results[4][0] == results[1][0] == (steps if steps > 0 else 20)  # optimizer steps
    assert torch.equal(results[4][1], results[1][1])  # bit-identical student
    assert results[4][2] == results[1][2]  # same learning rate at the end


def test_module_pickles_after_a_grouped_fit_and_fits_again(tmp_path):
    trainer, model = _fit(3, epochs=1)
    assert trainer.global_step == 10
    torch.save(model, tmp_path / "model.pt")  # no per-fit closure left on the module
    again = _trainer(max_epochs=1)
    again.fit(model, DistillDataModule("mnist1d", batch_size=100, train_subset=1000))
    assert again.global_step == 10 and model.automatic_optimization  # back to one batch per step


def test_gradient_clipping_is_applied_in_grouped_mode():
    _, clipped = _fit(4, gradient_clip_val=1e-3)
    _, free = _fit(4)
    assert not torch.equal(_flat(clipped.student), _flat(free.student))


def test_two_stage_method_switches_stage_on_the_same_epoch():
    students = {}
    for k in (1, 3):
        pl.seed_everything(0, verbose=False)
        model = FitNet(student=ConvNet1D(width=8), teacher=ConvNet1D(width=16),
                       student_layers=["relu2"], stage1_epochs=1,
                       optimizer=partial(torch.optim.Adam, lr=1e-2))
        trainer = _trainer(max_epochs=2)
        trainer.fit(model, DistillDataModule("mnist1d", train_subset=600, batches_per_step=k))
        students[k] = _flat(model.student)
    assert torch.equal(students[1], students[3])


def test_manual_optimisation_method_sees_minibatch_indices():
    """MutualDistillation optimises manually; grouped, its pi schedule and steps are unchanged."""
    out = {}
    for k in (1, 5):
        pl.seed_everything(0, verbose=False)
        model = MutualDistillation(student=MLP(), rules=[MNIST1DTemplateRule(learnable=True)], pi_rate=0.9,
                                   optimizer=partial(torch.optim.Adam, lr=1e-2))
        pis = []
        model.current_pi = (lambda f: (lambda i: pis.append(f(i)) or pis[-1]))(model.current_pi)
        trainer = _trainer(max_epochs=2)
        trainer.fit(model, DistillDataModule("mnist1d", train_subset=1000, batches_per_step=k))
        out[k] = (trainer.global_step, pis, _flat(model.student))
    assert out[5][0] == out[1][0] == 20
    assert out[5][1] == out[1][1]
    assert torch.equal(out[5][2], out[1][2])


def test_bad_batches_per_step_and_accumulation_are_refused():
    with pytest.raises(KDConfigError, match="batches_per_step must be >= 1"):
        DistillDataModule("mnist1d", batches_per_step=0)
    model = Supervised(student=MLP())
    with pytest.raises(KDConfigError, match="accumulate_grad_batches"):
        _trainer(accumulate_grad_batches=2).fit(model, DistillDataModule("mnist1d", batches_per_step=2))


def test_resume_refuses_to_switch_between_one_and_several_batches_per_step(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = Supervised(student=MLP())
    trainer = _trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=str(tmp_path))
    trainer.fit(model, DistillDataModule("mnist1d", train_subset=300, batches_per_step=3))
    ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    ckpt = ckpt or str(next(tmp_path.rglob("*.ckpt")))
    # same k: resumes and keeps counting optimizer steps
    again = _trainer(max_epochs=2)
    again.fit(Supervised(student=MLP()), DistillDataModule("mnist1d", train_subset=300, batches_per_step=3),
              ckpt_path=ckpt)
    assert again.global_step == 6
    with pytest.raises(KDConfigError, match="batches_per_step=3"):
        _trainer(max_epochs=2).fit(Supervised(student=MLP()),
                                   DistillDataModule("mnist1d", train_subset=300), ckpt_path=ckpt)


def test_refit_after_a_grouped_fit_with_gradient_clipping():
    """A module grouped in one fit can be fitted again with trainer-level clipping (which
    Lightning refuses in manual optimisation), grouped or not, and clipping is applied."""
    _, model = _fit(4, epochs=1)
    for k in (1, 4):
        before = _flat(model.student).clone()
        trainer = _trainer(max_epochs=1, gradient_clip_val=1e-3)
        trainer.fit(model, DistillDataModule("mnist1d", batch_size=100, train_subset=1000,
                                             batches_per_step=k))
        assert trainer.global_step == 10
        # Adam's step is about lr * sign(grad) regardless of clipping; SGD shows the clip
    pl.seed_everything(0, verbose=False)
    clipped = {}
    for clip in (None, 1e-3):
        model = Supervised(student=MLP(), optimizer=partial(torch.optim.SGD, lr=0.5))
        _trainer(max_epochs=1).fit(model, DistillDataModule("mnist1d", train_subset=1000, batches_per_step=4))
        start = _flat(model.student).clone()
        _trainer(max_epochs=1, gradient_clip_val=clip).fit(
            model, DistillDataModule("mnist1d", batch_size=100, train_subset=1000, batches_per_step=4))
        clipped[clip] = (_flat(model.student) - start).norm()
    # 10 SGD steps of lr 0.5 with gradients clipped to norm 1e-3 move the weights by <= 5e-3
    assert clipped[1e-3] <= 10 * 0.5 * 1e-3 + 1e-6 < clipped[None]


class _ForgetfulSupervised(Supervised):
    """Overrides the hooks the training machinery needs, without calling super()."""

    def setup(self, stage):  # noqa: D102 - deliberately no super()
        self.num_classes = 10
        self.build_metrics(10)

    def on_train_epoch_end(self):
        pass

    def on_before_optimizer_step(self, optimizer):
        pass

    def on_train_start(self):
        pass


def test_overriding_hooks_without_super_keeps_grouping_clipping_and_logging():
    pl.seed_everything(0, verbose=False)
    students = {}
    for cls in (Supervised, _ForgetfulSupervised):
        pl.seed_everything(0, verbose=False)
        model = cls(student=MLP(), optimizer=partial(torch.optim.SGD, lr=0.5),
                    lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
        trainer = _trainer(max_epochs=2, gradient_clip_val=1e-2)
        trainer.fit(model, DistillDataModule("mnist1d", batch_size=100, train_subset=1000,
                                             batches_per_step=4))
        assert trainer.global_step == 20
        assert trainer.optimizers[0].param_groups[0]["lr"] == 0.5 * 0.5**2  # epoch scheduler
        students[cls] = _flat(model.student)
    assert torch.equal(students[Supervised], students[_ForgetfulSupervised])


def test_a_method_cannot_take_over_the_training_step():
    with pytest.raises(TypeError, match="implement compute_losses"):
        class Bad(Supervised):  # noqa: F841
            def training_step(self, batch, batch_idx):
                return None
    with pytest.raises(TypeError, match="implement extra_callbacks"):
        class AlsoBad(Supervised):  # noqa: F841
            def configure_callbacks(self):
                return []


def test_user_optimizer_hooks_and_callbacks_run_in_grouped_mode():
    """optimizer_step / optimizer_zero_grad overrides and on_before_zero_grad callbacks are
    called once per minibatch, as in automatic optimisation."""
    calls = {"step": 0, "zero_grad": 0, "callback": 0}

    class Counting(Supervised):
        def optimizer_step(self, *args, **kwargs):
            calls["step"] += 1
            super().optimizer_step(*args, **kwargs)

        def optimizer_zero_grad(self, *args, **kwargs):
            calls["zero_grad"] += 1
            super().optimizer_zero_grad(*args, **kwargs)

    class ZeroGradCallback(pl.Callback):
        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            calls["callback"] += 1

    for k in (1, 4):
        for key in calls:
            calls[key] = 0
        model = Counting(student=MLP(), optimizer=partial(torch.optim.Adam, lr=1e-2))
        trainer = _trainer(max_epochs=2, callbacks=[ZeroGradCallback()])
        trainer.fit(model, DistillDataModule("mnist1d", batch_size=100, train_subset=1000,
                                             batches_per_step=k))
        assert calls == {"step": 20, "zero_grad": 20, "callback": 20}, (k, calls)
