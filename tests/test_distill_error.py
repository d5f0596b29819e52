"""The distillation error of seed 001, section 7, and the student's top-1 agreement with its teacher."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.methods import ResponseKD, Supervised
from kd_lightning.metrics import DistillationError
from kd_lightning.models import MLP, ConvNet1D
from tests.conftest import CONFIGS, TINY, run_cli, tb_scalars

# two examples, three classes
TEACHER = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(3.0), 0.0]])  # true-class p: 1/3, 3/5
STUDENT = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])  # true-class p: 1/2, 1/3
TARGET = torch.tensor([0, 1])


def test_distillation_error_at_temperature_one():
    metric = DistillationError()
    metric.update(STUDENT, TEACHER, TARGET)
    # (|1/3 - 1/2| + |3/5 - 1/3|) / 2 = (1/6 + 4/15) / 2 = 13/60
    assert float(metric.compute()) == pytest.approx(13 / 60, abs=1e-7)


def test_distillation_error_at_temperature_gamma():
    metric = DistillationError(temperature=2.0)
    metric.update(STUDENT, TEACHER, TARGET)
    # logits / 2: the student's first example has p proportional to (sqrt 2, 1, 1), the teacher's
    # second (1, sqrt 3, 1); the uniform rows stay at 1/3
    gap_1 = math.sqrt(2) / (math.sqrt(2) + 2) - 1 / 3
    gap_2 = math.sqrt(3) / (math.sqrt(3) + 2) - 1 / 3
    assert float(metric.compute()) == pytest.approx((gap_1 + gap_2) / 2, abs=1e-7)


def test_distillation_error_is_zero_for_the_teacher_itself_and_ignores_other_classes():
    metric = DistillationError()
    metric.update(TEACHER, TEACHER, TARGET)
    assert float(metric.compute()) == 0.0
    # moving probability among the wrong classes leaves the true-class probability unchanged
    metric.reset()
    metric.update(torch.tensor([[0.0, 1.0, -1.0]]), torch.tensor([[0.0, -1.0, 1.0]]), torch.tensor([0]))
    assert float(metric.compute()) == pytest.approx(0.0, abs=1e-7)


def test_distillation_error_is_a_mean_over_examples_not_over_batches():
    # what DDP does: each rank's sums and counts are added, so unequal shards weigh by examples
    torch.manual_seed(0)
    s, t, y = torch.randn(7, 5), torch.randn(7, 5), torch.randint(0, 5, (7,))
    whole = DistillationError()
    whole.update(s, t, y)
    rank0, rank1 = DistillationError(), DistillationError()
    rank0.update(s[:2], t[:2], y[:2])
    rank1.update(s[2:], t[2:], y[2:])
    rank0.merge_state(rank1)
    expected = (s.softmax(-1)[torch.arange(7), y] - t.softmax(-1)[torch.arange(7), y]).abs().mean()
    assert float(rank0.compute()) == pytest.approx(float(expected), abs=1e-6)
    assert float(whole.compute()) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_non_positive_temperature_is_refused(gamma):
    with pytest.raises(KDConfigError, match="must be > 0"):
        DistillationError(temperature=gamma)
    with pytest.raises(KDConfigError, match="distill_error_temperature must be > 0"):
        ResponseKD(student=MLP(), teacher=ConvNet1D(width=8), distill_error_temperature=gamma)


def test_trainer_logs_distillation_error_and_agreement_for_validation_and_test():
    pl.seed_everything(0)
    model = ResponseKD(student=MLP(), teacher=ConvNet1D(width=8), distill_error_temperature=2.0)
    dm = DistillDataModule("mnist1d", batch_size=50, train_subset=200, eval_batch_size=300)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, dm)
    for key in ("val/distill_error", "val/teacher_agreement"):
        assert key in trainer.callback_metrics
    metrics = trainer.test(model, dm, verbose=False)[0]
    x, y = dm.test_dataset.get_batch(torch.arange(len(dm.test_dataset)))[:2]
    model.eval()
    with torch.no_grad():
        s, t = model.student(x), model.teacher(x)
    rows = torch.arange(len(y))
    phi_s, phi_t = (s / 2).softmax(-1)[rows, y], (t / 2).softmax(-1)[rows, y]
    assert metrics["test/distill_error"] == pytest.approx(float((phi_s - phi_t).abs().mean()), abs=1e-5)
    agreement = (s.argmax(-1) == t.argmax(-1)).float().mean()
    assert metrics["test/teacher_agreement"] == pytest.approx(float(agreement), abs=1e-6)


def test_no_teacher_no_distillation_error():
    model = Supervised(student=MLP(), num_classes=10)
    assert not hasattr(model, "val_distill_error") and not hasattr(model, "test_teacher_agreement")
    dm = DistillDataModule("mnist1d", batch_size=50, train_subset=100)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, dm)
    metrics = trainer.test(model, dm, verbose=False)[0]
    assert "test/acc" in metrics and not any("distill_error" in k or "agreement" in k for k in metrics)


def test_cli_run_logs_distillation_error_to_tensorboard(mnist1d_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/response.yaml", *TINY,
                   "--model.init_args.teacher_checkpoint", mnist1d_teacher,
                   "--model.init_args.distill_error_temperature", "4"])
    assert cli.model.test_distill_error.temperature == 4.0
    scalars = tb_scalars(cli.trainer.log_dir)
    for key in ("val/distill_error", "val/teacher_agreement", "test/distill_error",
                "test/teacher_agreement"):
        assert key in scalars and all(0.0 <= v <= 1.0 for v in scalars[key]), key
