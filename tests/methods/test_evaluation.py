"""Evaluation metrics beyond accuracy: the distillation error (how closely the student follows its
teacher) and predictive uncertainty with MC dropout, by hand, in the trainer and through the CLI."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from kd_lightning import KDConfigError, metrics as metrics_module
from kd_lightning.data import DistillDataModule
from kd_lightning.methods import ResponseKD, Supervised
from kd_lightning.metrics import (DistillationError, PredictiveUncertainty, mc_dropout_predictive,
                                  mc_dropout_probs)
from kd_lightning.models import MLP, ConvNet1D
from tests.conftest import CONFIGS, TINY, run_cli, run_cli_error, tb_scalars


# two examples, three classes
TEACHER = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(3.0), 0.0]])  # true-class p: 1/3, 3/5
STUDENT = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])  # true-class p: 1/2, 1/3
TARGET = torch.tensor([0, 1])
# float32: a softmax over 3 classes rounds each probability ~6 times (exp, sum, divide, and the
# logits' own rounding), so a mean of differences of two probabilities is off by <= 12 eps32
GAP_TOL = 12 * torch.finfo(torch.float32).eps


def test_distillation_error_at_temperature_one():
    metric = DistillationError()
    metric.update(STUDENT, TEACHER, TARGET)
    # (|1/3 - 1/2| + |3/5 - 1/3|) / 2 = (1/6 + 4/15) / 2 = 13/60
    assert float(metric.compute()) == pytest.approx(13 / 60, abs=GAP_TOL)


def test_distillation_error_at_temperature_gamma():
    metric = DistillationError(temperature=2.0)
    metric.update(STUDENT, TEACHER, TARGET)
    # logits / 2: the student's first example has p proportional to (sqrt 2, 1, 1), the teacher's
    # second (1, sqrt 3, 1); the uniform rows stay at 1/3
    gap_1 = math.sqrt(2) / (math.sqrt(2) + 2) - 1 / 3
    gap_2 = math.sqrt(3) / (math.sqrt(3) + 2) - 1 / 3
    assert float(metric.compute()) == pytest.approx((gap_1 + gap_2) / 2, abs=GAP_TOL)


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


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_distillation_error_over_the_training_examples_at_the_end_of_fit_by_hand(mixup):
    """Phi_{gamma,n} over the n = 20 labelled training examples (2 per class), at gamma = 2, against
    a float64 loop over the examples: with the teacher's per-example cache (no mixing) and with
    mixed training batches (MixUp), which the measurement does not mix."""
    import copy

    pl.seed_everything(0)
    model = ResponseKD(student=MLP(dropout=0.2), teacher=ConvNet1D(width=8), distill_error_temperature=2.0)
    dm = DistillDataModule("mnist1d", batch_size=8, train_subset_per_class=2, eval_batch_size=6,
                           mixup=mixup)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, dm)
    phi = float(trainer.callback_metrics["train/distill_error"])
    assert model.teacher_cache_used == (mixup == 0)
    assert model.student.training  # the module's modes are restored after the pass
    student, teacher = copy.deepcopy(model.student).double().eval(), copy.deepcopy(model.teacher).double().eval()
    x, y, index = dm._dataset(dm.splits().x_train, dm.splits().y_train, dm.labelled_indices).get_batch(
        torch.arange(20))
    assert sorted(index.tolist()) == sorted(dm.labelled_indices.tolist()) and len(set(y.tolist())) == 10
    gaps = []
    with torch.no_grad():
        for i in range(20):  # one example at a time, float64
            zs, zt, c = student(x[i:i + 1].double())[0].tolist(), teacher(x[i:i + 1].double())[0].tolist(), int(y[i])
            p_s = math.exp(zs[c] / 2) / sum(math.exp(v / 2) for v in zs)
            p_t = math.exp(zt[c] / 2) / sum(math.exp(v / 2) for v in zt)
            gaps.append(abs(p_t - p_s))
    assert phi == pytest.approx(sum(gaps) / 20, rel=1e-5, abs=1e-7)
    assert phi > 0


@pytest.mark.parametrize("limit, batches", [(2, 2), (0.5, 2), (1.0, 3)])
def test_the_fit_end_pass_is_limited_as_the_training_batches_are(limit, batches, monkeypatch):
    """limit_train_batches (a count or a fraction) bounds the Phi pass over the labelled training
    examples as it bounds the training loop, so a debugging run stays short; 1.0 passes them all."""
    seen = []
    real = ResponseKD.training_distill_error

    def counting(self, loader):
        loader = list(loader)
        seen.append(len(loader))
        return real(self, loader)

    monkeypatch.setattr(ResponseKD, "training_distill_error", counting)
    pl.seed_everything(0)
    model = ResponseKD(student=MLP(), teacher=ConvNet1D(width=8))
    dm = DistillDataModule("mnist1d", batch_size=8, train_subset_per_class=3, eval_batch_size=10)  # 30: 3 batches
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, limit_val_batches=0,
                         limit_train_batches=limit, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")
    trainer.fit(model, dm)
    assert seen == [batches] and 0 <= float(trainer.callback_metrics["train/distill_error"]) <= 1


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
                "test/teacher_agreement", "train/distill_error"):
        assert key in scalars and all(0.0 <= v <= 1.0 for v in scalars[key]), key


UNCERTAINTY_KEYS = ["ece", "nll", "entropy", "mc_acc", "mc_ece", "mc_nll", "mc_entropy",
                    "mc_expected_entropy", "mc_mutual_info"]


def _entropy64(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p if q > 0)


def _mc_split64(passes: list[list[list[float]]]) -> tuple[float, float, float]:
    """Total predictive entropy, expected entropy and mutual information, mean over examples, in
    float64 with explicit loops: ``passes[t][i]`` is pass t's distribution for example i."""
    n, t_count = len(passes[0]), len(passes)
    total = expected = mutual = 0.0
    for i in range(n):
        mean = [sum(passes[t][i][k] for t in range(t_count)) / t_count for k in range(len(passes[0][i]))]
        h_mean = _entropy64(mean)
        h_expected = sum(_entropy64(passes[t][i]) for t in range(t_count)) / t_count
        total, expected, mutual = total + h_mean, expected + h_expected, mutual + h_mean - h_expected
    return total / n, expected / n, mutual / n


def test_mc_uncertainty_split_into_expected_entropy_and_mutual_information_by_hand():
    # three MC passes over three examples of three classes: the first example is certain in every
    # pass but changes its mind between passes (epistemic), the second is unsure the same way in
    # every pass (aleatoric), the third a mix
    passes = [[[0.98, 0.01, 0.01], [0.4, 0.3, 0.3], [0.7, 0.2, 0.1]],
              [[0.01, 0.98, 0.01], [0.4, 0.3, 0.3], [0.5, 0.25, 0.25]],
              [[0.01, 0.01, 0.98], [0.4, 0.3, 0.3], [0.2, 0.6, 0.2]]]
    mean = torch.tensor(passes, dtype=torch.float64).mean(0).float()
    per_example = [sum(_entropy64(passes[t][i]) for t in range(3)) / 3 for i in range(3)]
    metric = PredictiveUncertainty(num_classes=3, mc=True)
    metric.update(mean[:2], torch.tensor([0, 0]), torch.tensor(per_example[:2]))
    metric.update(mean[2:], torch.tensor([1]), torch.tensor(per_example[2:]))
    out = metric.compute()
    total, expected, mutual = _mc_split64(passes)
    assert float(out["entropy"]) == pytest.approx(total, rel=1e-5)
    assert float(out["expected_entropy"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["mutual_info"]) == pytest.approx(mutual, rel=1e-5)
    assert mutual > 0.3 and float(out["mutual_info"]) + float(out["expected_entropy"]) == \
        pytest.approx(float(out["entropy"]), rel=1e-5)
    # the second example alone: the same distribution in every pass, no epistemic part
    alone = PredictiveUncertainty(num_classes=3, mc=True)
    alone.update(mean[1:2], torch.tensor([0]), torch.tensor(per_example[1:2]))
    assert float(alone.compute()["mutual_info"]) == pytest.approx(0.0, abs=1e-6)
    plain = PredictiveUncertainty(num_classes=3)  # a deterministic prediction has no split
    plain.update(mean, torch.tensor([0, 0, 1]))
    assert set(plain.compute()) == {"acc", "ece", "nll", "entropy"}


def test_mc_dropout_predictive_is_the_passes_mean_and_their_mean_entropy():
    torch.manual_seed(0)
    net = _bn_dropout_net()
    net.eval()
    x = torch.randn(4, 6)
    torch.manual_seed(3)
    probs, expected_entropy = mc_dropout_predictive(net, x, samples=5)
    torch.manual_seed(3)
    assert torch.equal(probs, mc_dropout_probs(net, x, samples=5))  # the same passes, in order
    net[3].train()  # by hand: the same five dropout masks, one pass at a time, in float64
    torch.manual_seed(3)
    passes = [net(x).double().softmax(-1).tolist() for _ in range(5)]
    for i in range(4):
        h = sum(_entropy64(passes[t][i]) for t in range(5)) / 5
        assert float(expected_entropy[i]) == pytest.approx(h, rel=1e-5)
        mean = [sum(passes[t][i][k] for t in range(5)) / 5 for k in range(3)]
        assert probs[i].tolist() == pytest.approx(mean, rel=1e-5)


def test_predictive_uncertainty_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.65, 0.35], [0.25, 0.75]])
    target = torch.tensor([0, 1, 1])  # right (confidence 0.9), wrong (0.65), right (0.75)
    metric = PredictiveUncertainty(num_classes=2)
    metric.update(probs[:1], target[:1])
    metric.update(probs[1:], target[1:])
    out = metric.compute()
    assert float(out["acc"]) == pytest.approx(2 / 3)
    # one example per confidence bin: (|1 - 0.9| + |0 - 0.65| + |1 - 0.75|) / 3
    assert float(out["ece"]) == pytest.approx((0.1 + 0.65 + 0.25) / 3, abs=1e-6)
    assert float(out["nll"]) == pytest.approx(-(math.log(0.9) + math.log(0.35) + math.log(0.75)) / 3, abs=1e-6)

    def h(p):
        return -sum(q * math.log(q) for q in p)

    assert float(out["entropy"]) == pytest.approx((h([0.9, 0.1]) + h([0.65, 0.35]) + h([0.25, 0.75])) / 3,
                                                  abs=1e-6)
    metric.reset()
    metric.update(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))  # a zero probability on the label
    assert math.isfinite(float(metric.compute()["nll"]))


def _bn_dropout_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_mc_dropout_samples_dropout_only_and_restores_modes():
    torch.manual_seed(0)
    net = _bn_dropout_net()
    net.train()
    net(torch.randn(32, 6) * 3 + 1)  # give the batch norm running statistics of its own
    x = torch.randn(5, 6)
    running = net[1].running_mean.clone()
    torch.manual_seed(7)
    mc = mc_dropout_probs(net, x, samples=4)
    assert net.training and all(m.training for m in net.modules())  # modes restored
    assert torch.equal(net[1].running_mean, running)  # batch norm ran in eval mode
    # by hand: batch norm in eval mode (running statistics), only the dropout layer sampling
    net.eval()
    net[3].train()
    torch.manual_seed(7)
    expected = sum(net(x).softmax(-1) for _ in range(4)) / 4
    assert torch.allclose(mc, expected, atol=1e-6)
    net.eval()
    assert not torch.allclose(mc, net(x).softmax(-1), atol=1e-3)  # the passes did sample


def test_mc_dropout_needs_dropout_layers():
    with pytest.raises(KDConfigError, match="MC dropout needs dropout layers, but MLP has none"):
        mc_dropout_probs(MLP(), torch.randn(2, 40), samples=3)


def test_mlp_dropout_layers():
    plain, dropped = MLP(), MLP(dropout=0.3)
    assert set(plain.state_dict()) == set(dropped.state_dict())  # dropout has no weights
    names = dict(dropped.named_modules())
    assert isinstance(names["drop1"], nn.Dropout) and names["drop2"].p == 0.3
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    dropped.eval()
    x = torch.randn(4, 40)
    assert torch.equal(dropped(x), dropped.fc(dropped.forward_features(x)))
    with pytest.raises(KDConfigError, match=r"dropout must be in \[0, 1\)"):
        MLP(dropout=1.0)


@pytest.mark.parametrize("samples, student, message", [
    (3, MLP(), "the student \\(MLP\\) has no dropout layer"),
    (-1, MLP(dropout=0.2), "mc_dropout_samples must be an integer >= 0"),
    (2.5, MLP(dropout=0.2), "mc_dropout_samples must be an integer >= 0"),
])
def test_bad_mc_dropout_settings_are_refused(samples, student, message):
    with pytest.raises(KDConfigError, match=message):
        Supervised(student=student, mc_dropout_samples=samples)


def _fit_and_test(model):
    dm = DistillDataModule("mnist1d", batch_size=50, train_subset=200, eval_batch_size=1000)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         limit_val_batches=0)
    trainer.fit(model, dm)
    return trainer.test(model, dm, verbose=False)[0], dm


def test_student_and_teacher_uncertainty_reported_at_test_time(monkeypatch):
    pl.seed_everything(0)
    teacher = MLP(hidden_dims=[64, 64], dropout=0.3)
    model = ResponseKD(student=MLP(dropout=0.2), teacher=teacher, mc_dropout_samples=5)
    calls = []  # (network, samples, MC probabilities, expected entropies) of every MC pass at test time

    def recorded(net, x, samples):
        p, expected = mc_dropout_predictive(net, x, samples)
        calls.append((net, samples, p, expected))
        return p, expected

    monkeypatch.setattr(metrics_module, "mc_dropout_predictive", recorded)
    metrics, dm = _fit_and_test(model)
    for key in UNCERTAINTY_KEYS:
        assert f"test/{key}" in metrics and f"test/teacher_{key}" in metrics
    # the deterministic NLL is the test cross-entropy
    assert metrics["test/nll"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    # one test batch: the student's and the teacher's mean of 5 dropout passes are reported
    assert [(net, samples) for net, samples, *_ in calls] == [(model.student, 5), (model.teacher, 5)]
    y = dm.test_dataset.get_batch(torch.arange(len(dm.test_dataset)))[1]
    for prefix, (_, _, p, expected) in zip(("", "teacher_"), calls):
        assert metrics[f"test/{prefix}mc_acc"] == pytest.approx(float((p.argmax(-1) == y).float().mean()))
        nll = -p[torch.arange(len(y)), y].log().mean()
        assert metrics[f"test/{prefix}mc_nll"] == pytest.approx(float(nll), abs=1e-5)
        entropy = -(p * p.log()).sum(-1).mean()
        assert metrics[f"test/{prefix}mc_entropy"] == pytest.approx(float(entropy), abs=1e-5)
        assert metrics[f"test/{prefix}mc_expected_entropy"] == pytest.approx(float(expected.mean()), abs=1e-5)
        assert metrics[f"test/{prefix}mc_mutual_info"] == pytest.approx(float(entropy - expected.mean()),
                                                                        abs=1e-5)
        assert 0 < metrics[f"test/{prefix}mc_mutual_info"] < metrics[f"test/{prefix}mc_entropy"]
    assert all(not m.training for m in model.teacher.modules())  # the teacher is back in eval mode


def test_teacher_without_dropout_gets_its_deterministic_report_only():
    pl.seed_everything(0)
    with pytest.warns(UserWarning, match="the teacher \\(ConvNet1D\\) has no dropout layer"):
        model = ResponseKD(student=MLP(dropout=0.2), teacher=ConvNet1D(width=8), mc_dropout_samples=3)
    metrics, _ = _fit_and_test(model)
    assert "test/mc_ece" in metrics and "test/teacher_ece" in metrics
    assert not any(k.startswith("test/teacher_mc_") for k in metrics)


def test_uncertainty_is_off_by_default():
    pl.seed_everything(0)
    metrics, _ = _fit_and_test(Supervised(student=MLP(dropout=0.2)))
    assert "test/acc" in metrics
    assert not any(f"test/{key}" in metrics for key in UNCERTAINTY_KEYS)


def test_cli_refuses_mc_dropout_on_a_student_without_dropout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = run_cli_error(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                         "--model.init_args.mc_dropout_samples", "10"], capsys)
    assert "the student (MLP) has no dropout layer" in err and "dropout: 0.2" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_cli_reports_mc_dropout_uncertainty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                   "--model.init_args.student.init_args.dropout", "0.2",
                   "--model.init_args.mc_dropout_samples", "4"])
    metrics = cli.trainer.callback_metrics
    for key in UNCERTAINTY_KEYS:
        assert math.isfinite(float(metrics[f"test/{key}"])), key
    assert 0.0 <= float(metrics["test/mc_ece"]) <= 1.0
