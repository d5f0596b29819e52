"""DDP gives the single-process figures: every evaluation example counted once, and a killed
2-process run resumes to the same weights.

The DDP runs are the real ``kd-lightning`` CLI in a subprocess (``--trainer.strategy ddp`` on CPU,
gloo), on MNIST-1D with a small training subset."""

from __future__ import annotations

import csv
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import CONFIGS, REPO, run_cli_subprocess

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def mnist1d_data() -> None:
    """MNIST-1D under ``data/mnist1d`` (generated offline and cached there; the DDP runs below read
    it from the repository's data folder, whatever ran before them)."""
    from kd_lightning.data.sources import load_mnist1d

    load_mnist1d(str(REPO / "data"))
    assert (REPO / "data" / "mnist1d" / "mnist1d_generated.npz").is_file()


needs_mnist1d = pytest.mark.usefixtures("mnist1d_data")


def _workdir(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    if (REPO / "data").exists() and not (folder / "data").exists():
        (folder / "data").symlink_to(REPO / "data", target_is_directory=True)
    return folder


def _cli(workdir: Path, args: list) -> subprocess.CompletedProcess:
    return run_cli_subprocess([*args, *QUIET], workdir, {"KD_TEST_KILL_AT": None, "KD_TEST_SIGNAL": None})


def _ddp(devices: int) -> list[str]:
    return ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto"]


@needs_mnist1d
@pytest.mark.parametrize("batch_size", [111, 1000])
def test_eval_loaders_of_three_ranks_hold_every_test_example_once(batch_size):
    from kd_lightning.data import DistillDataModule

    seen = []
    batches = []
    for rank in range(3):
        dm = DistillDataModule(dataset="mnist1d", root=str(REPO / "data"), eval_batch_size=batch_size)
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 3, "rank": rank})
        dm.setup("test")
        loader = dm.test_dataloader()
        rank_batches = [batch[2] for batch in loader]  # (x, y, index)
        batches.append(len(rank_batches))
        seen += torch.cat(rank_batches).tolist()
    assert sorted(seen) == list(range(1000))  # no example padded in, none left out
    # 334 / 333 / 333 examples: with 111 per batch rank 0 runs one batch more than the others
    assert batches == ([4, 3, 3] if batch_size == 111 else [1, 1, 1])


def test_eval_loader_refuses_fewer_examples_than_ranks():
    from kd_lightning import KDConfigError
    from kd_lightning.data import DistillDataModule
    from kd_lightning.data.dataset import IndexedTensorDataset

    dm = DistillDataModule(dataset="mnist1d")
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 3, "rank": 0})
    ds = IndexedTensorDataset(torch.zeros(2, 1, 40), torch.zeros(2, dtype=torch.long), None,
                              torch.zeros(1), torch.ones(1))
    with pytest.raises(KDConfigError, match="the test split has 2 examples, fewer than the 3"):
        dm._eval_loader(ds, "test")


@needs_mnist1d
def test_test_loss_is_the_mean_over_examples_with_unequal_batches(tmp_path, monkeypatch):
    import torch.nn.functional as F

    from tests.conftest import TINY, run_cli

    (tmp_path / "data").symlink_to(REPO / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    # 1000 test examples in batches of 111: nine of 111 and one of 1
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                   "--trainer.limit_test_batches", "1.0", "--data.eval_batch_size", "111"])
    ds = cli.datamodule.test_dataset
    x, y = ds.get_batch(torch.arange(len(ds)))[:2]
    cli.model.student.eval()
    with torch.no_grad():
        expected = F.cross_entropy(cli.model.student(x).float(), y)
    assert float(cli.trainer.callback_metrics["test/loss"]) == pytest.approx(float(expected), rel=1e-5)


def _csv_metrics(folder: Path) -> dict[str, float]:
    (path,) = folder.rglob("metrics.csv")
    out = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


@needs_mnist1d
@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(2400)
def test_validation_and_test_accuracy_with_three_ranks_equal_one_rank(tmp_path):
    work = _workdir(tmp_path)
    config = ["--config", CONFIGS / "mnist1d/student.yaml", "--data.train_subset", "200",
              "--data.batches_per_step", "1"]
    # trained on 3 ranks; 400 validation examples in batches of 133: rank 0 validates 134 in
    # 2 batches, ranks 1 and 2 133 in 1
    fit = _cli(work, ["fit", *config, *_ddp(3), "--seed_everything", "0", "--trainer.max_epochs", "1",
                      "--data.eval_batch_size", "133", "--trainer.logger.init_args.name", "s",
                      "--test_after_fit", "false"])
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = work / "runs/s/version_0/checkpoints/last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    (val_acc_3,) = [s["best_model_score"] for k, s in state["callbacks"].items()
                    if "ModelCheckpoint" in k and "val/acc" in k]
    figures = {}
    for devices in (1, 3):
        # 111 per batch: rank 0 evaluates 334 test examples in 4 batches, ranks 1 and 2 333 in 3
        test = _cli(work, ["test", *config, *_ddp(devices),
                           "--data.eval_batch_size", "111", "--ckpt_path", ckpt,
                           "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
                           "--trainer.logger.init_args.save_dir", f"eval{devices}"])
        assert test.returncode == 0, test.stderr[-3000:]
        figures[devices] = _csv_metrics(work / f"eval{devices}")
    val = _cli(work, ["validate", *config, "--ckpt_path", ckpt,
                      "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
                      "--trainer.logger.init_args.save_dir", "val1"])
    assert val.returncode == 0, val.stderr[-3000:]
    one, three = figures[1], figures[3]
    assert 0.1 < one["test/acc"] < 1.0  # a briefly trained model: duplicates would show
    assert three["test/acc"] == one["test/acc"]
    assert three["test/errors"] == one["test/errors"]
    assert three["test/loss"] == pytest.approx(one["test/loss"], rel=1e-6)
    # the validation accuracy the 3-rank run saw is the single-process figure
    assert float(val_acc_3) == _csv_metrics(work / "val1")["val/acc"]

def _fit_ddp(workdir: Path, args: list, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """A 2-process DDP ``fit``; with ``kill_at`` every rank SIGKILLs itself at that batch (rank 1
    is rank 0's child: whatever survives the kill is stopped with the process group)."""
    return run_cli_subprocess(["fit", *args, *QUIET, *_ddp(2), "--trainer.deterministic", "true",
                               "--seed_everything", "0", "--trainer.callbacks+=tests.kill_helpers.KillAt"],
                              workdir, {"KD_TEST_SIGNAL": "SIGKILL", "KD_TEST_KILL_AT": kill_at},
                              timeout=1200)


@needs_mnist1d
@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(2400)
def test_two_process_ddp_killed_resumes_to_the_same_student(tmp_path):
    # dropout: every rank draws masks from its random state, which the resume must restore
    args = ["--config", CONFIGS / "mnist1d/student.yaml", "--data.train_subset", "200",
            "--data.batch_size", "20", "--data.batches_per_step", "1", "--trainer.max_epochs", "3",
            "--model.init_args.student.init_args.dropout", "0.2",
            "--trainer.logger.init_args.name", "ddp", "--test_after_fit", "false"]
    full_dir, killed_dir = _workdir(tmp_path / "a"), _workdir(tmp_path / "b")
    full = _fit_ddp(full_dir, args)
    assert full.returncode == 0, full.stderr[-3000:]
    # 200 examples, 2 ranks, 20 per batch: 5 batches per rank and epoch; killed in epoch 1
    killed = _fit_ddp(killed_dir, args, kill_at="1:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = killed_dir / "runs/ddp/version_0/checkpoints"
    assert torch.load(run / "last.ckpt", weights_only=True)["epoch"] == 0  # the kill lost epoch 1
    resumed = _fit_ddp(killed_dir, [*args, "--ckpt_path", run / "last.ckpt"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(full_dir / "runs/ddp/version_0/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(run / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), f"{key} differs after resume"
