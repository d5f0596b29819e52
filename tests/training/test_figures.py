"""Inspection in TensorBoard: the confusion matrix, the methods' figures (FSP matrices, attention
maps, MutualDistillation's rule weights and pi) and the hparams with the final test metrics; other
loggers run through the same config without figures."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.training.figures import InspectionFigures
from tests.conftest import CONFIGS, TINY, run_cli, run_cli_error


def tb_events(log_dir: Path):
    """Every event file of a run folder, read back as TensorBoard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def hparams_of(acc) -> tuple[list[str], set[str]]:
    """(metric tags listed in the HParams tab, names of the hyperparameters) of a run."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return [m.name.tag for m in experiment.metric_infos], set(start.session_start_info.hparams)


# ---- the confusion matrix, by hand -------------------------------------------------------------
class FixedPredictions(pl.LightningModule):
    """Predicts the class written in the first input feature (so the confusion matrix is known)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.unused = torch.nn.Linear(1, 1)

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].long(), self.num_classes).float()

    def validation_step(self, batch, batch_idx):
        return None


def _validate(logger, callback, preds, labels, tmp_path):
    x = torch.tensor(preds, dtype=torch.float32).view(-1, 1)
    y = torch.tensor(labels)
    loader = DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=3)
    trainer = pl.Trainer(logger=logger, callbacks=[callback], accelerator="cpu", devices=1,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.validate(FixedPredictions(3), loader)
    return trainer


def test_confusion_matrix_counts_equal_a_hand_count(tmp_path):
    preds = [0, 1, 2, 2, 1, 0, 0]
    labels = [0, 1, 1, 2, 0, 0, 2]
    # rows: true class; columns: predicted class
    #   true 0 at positions 0, 4, 5 -> predicted 0, 1, 0
    #   true 1 at positions 1, 2    -> predicted 1, 2
    #   true 2 at positions 3, 6    -> predicted 2, 0
    expected = torch.tensor([[2, 1, 0], [0, 1, 1], [1, 0, 1]])
    callback = InspectionFigures(every_n_epochs=1)
    trainer = _validate(TensorBoardLogger(tmp_path, name="cm"), callback, preds, labels, tmp_path)
    assert torch.equal(callback.last_confusion_matrix, expected)
    assert "val/confusion_matrix" in tb_events(Path(trainer.logger.log_dir)).Tags()["images"]


def test_a_callback_with_a_csv_logger_skips_figures_quietly(tmp_path):
    callback = InspectionFigures(every_n_epochs=1)
    trainer = _validate(CSVLogger(tmp_path, name="csv"), callback, [0, 1, 2], [0, 1, 2], tmp_path)
    assert callback.last_confusion_matrix is None
    assert not list(Path(trainer.logger.log_dir).glob("events.out.tfevents*"))


@pytest.mark.parametrize("kwargs", [{"every_n_epochs": -1}, {"every_n_epochs": 1.5}, {"num_examples": 0}])
def test_bad_settings_are_refused(kwargs):
    from kd_lightning import KDConfigError

    with pytest.raises(KDConfigError, match="inspection"):
        InspectionFigures(**kwargs)


# ---- CLI runs ----------------------------------------------------------------------------------
DIGITS = ["fit", "--config", CONFIGS / "digits/student.yaml", *TINY]


def test_cli_writes_the_confusion_matrix_and_hparams_with_test_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli([*DIGITS, "--trainer.max_epochs", "2", "--inspection.every_n_epochs", "1"])
    acc = tb_events(Path(cli.trainer.log_dir))
    steps = [e.step for e in acc.Images("val/confusion_matrix")]
    assert steps == [2, 4]  # one per validation epoch (2 steps each), none for the sanity check
    metrics, params = hparams_of(acc)
    assert {"test/acc", "test/errors", "hp_metric"} <= set(metrics)
    assert {"batch_size", "dataset", "num_classes"} <= params
    # the test metric the HParams tab shows is the one the test reported
    assert acc.Scalars("test/acc")[-1].value == pytest.approx(float(cli.trainer.callback_metrics["test/acc"]))


def test_figures_follow_the_interval_and_the_last_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli([*DIGITS, "--trainer.max_epochs", "3", "--inspection.every_n_epochs", "2"])
    acc = tb_events(Path(cli.trainer.log_dir))
    assert [e.step for e in acc.Images("val/confusion_matrix")] == [4, 6]  # epoch 2, and epoch 3 (last)


def test_a_long_fit_draws_about_ten_times():
    """Hundreds of one-step few-data epochs draw every ceil(epochs / MAX_DRAWS)-th epoch and the
    last, not every every_n_epochs-th (each drawing costs far more than such an epoch)."""
    from types import SimpleNamespace

    from kd_lightning.training.figures import MAX_DRAWS

    callback = InspectionFigures(every_n_epochs=10)

    def drawn(max_epochs):
        trainer = SimpleNamespace(sanity_checking=False, loggers=[TensorBoardLogger("tb")], max_epochs=max_epochs,
                                  state=SimpleNamespace(fn="fit"))
        return [e for e in range(1, max_epochs + 1)
                if callback._draws(SimpleNamespace(**vars(trainer), current_epoch=e - 1))]

    assert MAX_DRAWS == 10
    assert drawn(1500) == list(range(150, 1501, 150))  # every 150th, the last among them
    assert drawn(95) == [*range(10, 91, 10), 95]  # short fits keep every_n_epochs and the last
    assert drawn(1234) == [*range(124, 1234, 124), 1234]


def test_figures_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli([*DIGITS, "--inspection.every_n_epochs", "0"])
    acc = tb_events(Path(cli.trainer.log_dir))
    assert acc.Tags()["images"] == []
    assert "test/acc" in hparams_of(acc)[0]  # the hparams with test metrics stay


def test_hparams_without_a_test_carry_the_last_validation_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli([*DIGITS, "--test_after_fit", "false"])
    metrics, _ = hparams_of(tb_events(Path(cli.trainer.log_dir)))
    assert {"hp_metric", "val/acc"} <= set(metrics)
    assert not [m for m in metrics if m.startswith("test/")]


def test_bad_interval_on_the_command_line_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = run_cli_error([*DIGITS, "--inspection.every_n_epochs", "-2"], capsys)
    assert "every_n_epochs must be an integer >= 0" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_csv_logger_runs_through_the_same_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli([*DIGITS, "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
                   "--trainer.logger.save_dir", "csv_runs", "--inspection.every_n_epochs", "1"])
    assert not any(isinstance(cb, InspectionFigures) for cb in cli.trainer.callbacks)
    log_dir = Path(cli.trainer.log_dir)
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    tested = [r for r in rows if r.get("test/acc")]
    assert len(tested) == 1
    assert float(tested[0]["test/acc"]) == pytest.approx(float(cli.trainer.callback_metrics["test/acc"]))
    assert not list(tmp_path.rglob("events.out.tfevents*"))


@pytest.mark.parametrize("config, tag", [("fsp.yaml", "inspect/fsp_matrices"),
                                         ("at.yaml", "inspect/attention_maps")])
def test_feature_methods_draw_teacher_and_student(config, tag, mnist1d_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d" / config, *TINY, "--test_after_fit", "false",
                   "--model.init_args.teacher_checkpoint", mnist1d_teacher, "--data.train_subset", "100"])
    images = tb_events(Path(cli.trainer.log_dir)).Images(tag)
    assert len(images) == 1 and images[0].width > 0 and images[0].height > 0


def test_fsp_figure_shows_the_fsp_matrices_of_both_networks(mnist1d_teacher):
    from kd_lightning.losses.feature import fsp_matrix
    from kd_lightning.methods import FSP
    from kd_lightning.models import ConvNet1D

    torch.manual_seed(0)
    model = FSP(student_pairs=[["relu1", "relu2"]], pool="smaller", input_shape=[1, 40], num_classes=10,
                student=ConvNet1D(width=64, groups=4), teacher=ConvNet1D(width=64),
                teacher_checkpoint=str(mnist1d_teacher)).eval()
    x = torch.randn(3, 1, 40)
    with torch.no_grad():
        fig = model.inspection_figures((x, torch.zeros(3, dtype=torch.long), torch.arange(3)))["fsp_matrices"]
        _, feats = model.student_forward(x)
        _, t_feats = model.teacher_forward(x)
    # axes: teacher, student, |difference| (then their colour bars)
    for ax, f in ((fig.axes[0], t_feats), (fig.axes[1], feats)):
        shown = torch.as_tensor(ax.images[0].get_array().data)
        assert torch.allclose(shown, fsp_matrix(f[0], f[1], "smaller").mean(0), atol=1e-6)


def test_mutual_distillation_draws_rule_weights_and_pi(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/mutual_learnable.yaml", *TINY,
                   "--data.batch_size", "50", "--data.train_subset", "100", "--test_after_fit", "false"])
    assert len(tb_events(Path(cli.trainer.log_dir)).Images("inspect/rule_weights_and_pi")) == 1
    history = cli.model.weight_history
    assert history[-1][0] == cli.trainer.global_step
    assert history[-1][1] == pytest.approx(cli.model.rule_weights.detach().tolist())
