"""What a run prints: a line per epoch and per validation, flushed as training goes, when stdout is
not a terminal (a batch job's log); Lightning's live bar without ``v_num`` in a terminal; the
teacher a fit loaded, with the accuracy its checkpoint records; no warnings."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import warnings
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.loggers import TensorBoardLogger

from kd_lightning.cli import cli_main
from kd_lightning.models import ConvNet1D, EnsembleTeacher
from kd_lightning.models.teacher import RECORDED_METRICS, describe_teacher
from kd_lightning.training.progress import EpochLines, TerminalRichBar, console_progress_bar
from tests.conftest import CONFIGS, REPO, TINY, run_cli

# the subprocess waits at the start of its last epoch until the test has read the line of the
# epoch before it: a line that is not flushed when printed never arrives in time
WAIT_FOR_READER = '''
import os, time
from pytorch_lightning import Callback

class WaitForReader(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == trainer.max_epochs - 1:
            deadline = time.monotonic() + 120
            while not os.path.exists("line_read") and time.monotonic() < deadline:
                time.sleep(0.02)
            with open("wait.txt", "w") as f:
                f.write("line read" if os.path.exists("line_read") else "timed out")
'''
# the MNIST-1D teacher on 200 examples: 4 steps per epoch, validated every 2, 3 epochs
PIPED_FIT = ["fit", "--config", CONFIGS / "mnist1d" / "teacher.yaml", "--data.root", REPO / "data",
             "--data.train_subset", "200", "--data.batch_size", "50", "--data.batches_per_step", "1",
             "--trainer.max_epochs", "3", "--trainer.val_check_interval", "0.5",
             "--trainer.limit_test_batches", "2", "--trainer.enable_model_summary", "false",
             "--trainer.callbacks+=wait_for_reader.WaitForReader"]
# what a default run must not print (each was a warning or notice of every run)
NOISE = ("Warning", "LeafSpec", "litlogger", "Tip:", "transfer_batch_to_device",
         "override existing callbacks", "multiple `ModelCheckpoint`", "v_num", "logging interval")


@pytest.fixture(scope="module")
def piped_fit(tmp_path_factory):
    """``kd-lightning fit`` of the teacher with stdout a pipe, read line by line as it comes:
    ``(cwd, stdout lines, stderr)``."""
    from kd_lightning.data.sources import load_mnist1d

    load_mnist1d(str(REPO / "data"))  # (the generated data set, cached where the run reads it)
    cwd = tmp_path_factory.mktemp("piped")
    (cwd / "wait_for_reader.py").write_text(WAIT_FOR_READER)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{cwd}", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)  # Python's default warning filters, as in a shell
    with open(cwd / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "kd_lightning.cli", *map(str, PIPED_FIT)], cwd=cwd,
                                env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("epoch 2/3"):
                    (cwd / "line_read").touch()
            proc.wait(timeout=600)
        finally:
            proc.kill()
    err = (cwd / "stderr.txt").read_text()
    assert proc.returncode == 0, err[-3000:]
    return cwd, lines, err


def _value(line: str, name: str) -> float:
    return float(re.search(rf"(?:^|  ){re.escape(name)} (\S+)", line).group(1))


def test_a_piped_fit_prints_a_flushed_line_per_epoch_and_validation(piped_fit):
    cwd, lines, err = piped_fit
    # the line of epoch 2 reached the reader while the run was still going
    assert (cwd / "wait.txt").read_text() == "line read"
    progress = [line for line in lines if line.startswith(("epoch ", "validation "))]
    # per epoch: the validation half-way through, then the epoch's line (with the validation
    # that ends it)
    assert [[f.split(" ")[0] if f.startswith("train/") else f for f in line.split("  ")[:3]]
            for line in progress] == [
        part for k in (1, 2, 3) for part in (["validation", f"epoch {k}/3", f"step {4 * k - 2}"],
                                             [f"epoch {k}/3", f"step {4 * k}", "train/loss"])]
    for line in progress:
        assert re.search(r"  val/loss \d+\.\d{4}  val/acc \d\.\d{4}  .*elapsed \d+:\d\d$", line), line
        if line.startswith("epoch "):
            assert re.search(r"  train/loss_ce \d+\.\d{4}  train/acc \d\.\d{4}  ", line), line
            assert re.search(r"  lr \d\.\d\de-\d\d  ", line), line
    # the learning rate of each epoch: the cosine schedule (T_max 60) after 0, 1, 2 epochs
    rates = [_value(line, "lr") for line in progress if line.startswith("epoch ")]
    assert rates == pytest.approx([0.01 * (1 + torch.cos(torch.tensor(k * torch.pi / 60)).item()) / 2
                                   for k in range(3)], rel=1e-2)
    assert not [n for n in NOISE if n in err or any(n in line for line in lines)], err


def test_the_teacher_checkpoint_records_its_validation_and_test_accuracy(piped_fit):
    cwd, lines, _ = piped_fit
    best = torch.load(cwd / "runs" / "mnist1d_teacher" / "version_0" / "checkpoints" / "best.ckpt",
                      weights_only=True)
    published = torch.load(cwd / "runs" / "mnist1d_teacher" / "checkpoints" / "best.ckpt", weights_only=True)
    recorded = best[RECORDED_METRICS]
    assert published[RECORDED_METRICS] == recorded
    # best.ckpt: the best validation accuracy of the run (as printed, to 4 decimals) ...
    printed = [_value(line, "val/acc") for line in lines if "val/acc" in line]
    assert recorded["val/acc"] == pytest.approx(max(printed), abs=5e-5)
    # ... and the accuracy of its test after fit (Lightning's table of test metrics)
    for name in ("test/acc", "test/errors"):
        row = next(line for line in lines if re.search(rf"\s{name}\s", line))
        assert recorded[name] == pytest.approx(float(re.findall(r"\d+\.\d+", row)[-1]), abs=1e-6)


def test_a_distillation_fit_names_its_teacher_first(piped_fit, monkeypatch, capsys, tmp_path):
    cwd, _, _ = piped_fit
    teacher = cwd / "runs" / "mnist1d_teacher" / "checkpoints" / "best.ckpt"
    recorded = torch.load(teacher, weights_only=True)[RECORDED_METRICS]
    monkeypatch.chdir(tmp_path)
    run_cli(["fit", "--config", CONFIGS / "mnist1d" / "response.yaml", *TINY, "--test_after_fit", "false",
             "--data.root", REPO / "data", "--model.init_args.teacher_checkpoint", teacher])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"teacher: {teacher} (ConvNet1D, 28,298 parameters)  val/acc {recorded['val/acc']:.4f}  "
                      f"test/acc {recorded['test/acc']:.4f}  test/errors {recorded['test/errors']:.0f}")
    assert any(line.startswith("epoch 1/1  step 2  ") for line in out[1:])


def test_the_teacher_line_says_what_a_checkpoint_does_not_record(mnist1d_teacher, piped_fit):
    net = ConvNet1D(num_classes=10, width=64)
    assert describe_teacher(net, str(mnist1d_teacher)) == (  # a plain state_dict
        f"teacher: {mnist1d_teacher} (ConvNet1D, 28,298 parameters)  validation/test accuracy not "
        f"recorded in the checkpoint")
    assert describe_teacher(net, None) == "teacher: ConvNet1D, 28,298 parameters, weights as constructed (no checkpoint)"
    published = piped_fit[0] / "runs" / "mnist1d_teacher" / "checkpoints" / "best.ckpt"
    ensemble = EnsembleTeacher([ConvNet1D(num_classes=10, width=64), ConvNet1D(num_classes=10, width=8)],
                               checkpoints=[str(published), None])
    line = describe_teacher(ensemble, None)
    assert line.startswith(f"teacher: EnsembleTeacher, {28_298 + sum(p.numel() for p in ensemble.members[1].parameters()):,} "
                           f"parameters in 2 members; member 0: {published} (ConvNet1D, 28,298 parameters)  val/acc ")
    small = sum(p.numel() for p in ensemble.members[1].parameters())
    assert line.endswith(f"; member 1: ConvNet1D, {small:,} parameters, weights as constructed (no checkpoint)")


def test_kd_lightning_test_of_a_checkpoint_prints_no_warning(piped_fit, monkeypatch):
    cwd, _, _ = piped_fit
    monkeypatch.chdir(cwd)  # a new version folder beside the fit's
    best = cwd / "runs" / "mnist1d_teacher" / "version_0" / "checkpoints" / "best.ckpt"
    with warnings.catch_warnings(record=True) as caught, mock.patch.object(sys, "argv", ["kd-lightning"]):
        warnings.simplefilter("always")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)  # (hidden by Python's defaults)
        cli = cli_main(["test", "--config", str(CONFIGS / "mnist1d" / "teacher.yaml"), "--data.root",
                        str(REPO / "data"), "--data.train_subset", "200", "--data.batches_per_step", "1",
                        "--trainer.limit_test_batches", "1", "--ckpt_path", str(best)])
    assert "test/acc" in cli.trainer.callback_metrics
    assert not [str(w.message) for w in caught]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_keeps_the_live_bar_without_v_num(tmp_path):
    assert isinstance(console_progress_bar(io.StringIO()), EpochLines)
    bar = console_progress_bar(_Terminal())
    assert isinstance(bar, TerminalRichBar) and isinstance(bar, RichProgressBar)
    plain = RichProgressBar()
    for callback in (bar, plain):
        trainer = pl.Trainer(logger=TensorBoardLogger(tmp_path), callbacks=[callback],
                             enable_model_summary=False, accelerator="cpu")
        metrics = callback.get_metrics(trainer, None)
        assert ("v_num" in metrics) == (callback is plain)


def test_a_fit_of_hundreds_of_epochs_prints_at_most_a_hundred_epoch_lines(monkeypatch, capsys, tmp_path):
    # a few-data run: 250 one-step epochs -> the first, every 3rd (ceil(250 / 100)) and the last
    monkeypatch.chdir(tmp_path)
    run_cli(["fit", "--config", CONFIGS / "mnist1d" / "student.yaml", *TINY, "--trainer.max_epochs", "250",
             "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
             "--trainer.logger", "false", "--trainer.callbacks", "[]", "--test_after_fit", "false",
             "--data.root", REPO / "data"])
    epochs = [int(line.split()[1].split("/")[0]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("epoch ")]
    assert epochs == [1, *range(3, 250, 3), 250]
