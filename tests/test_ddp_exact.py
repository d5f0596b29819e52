"""DDP gives the single-process figures: every evaluation example counted once, and a killed
2-process run resumes to the same weights.

The DDP runs are the real ``kd-lightning`` CLI in a subprocess (``--trainer.strategy ddp`` on CPU,
gloo), on MNIST-1D with a small training subset."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import CONFIGS, REPO

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
needs_mnist1d = pytest.mark.skipif(not (REPO / "data" / "mnist1d").exists(),
                                   reason="needs the MNIST-1D data under data/mnist1d")


def _workdir(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    if (REPO / "data").exists() and not (folder / "data").exists():
        (folder / "data").symlink_to(REPO / "data", target_is_directory=True)
    return folder


def _cli(workdir: Path, args: list, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("KD_TEST_KILL_AT", None)
    env.pop("KD_TEST_SIGNAL", None)
    if kill_at:
        env["KD_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "kd_lightning.cli", *map(str, args), *QUIET]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


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
@pytest.mark.timeout(1800)
def test_test_accuracy_with_three_ranks_equals_one_rank(tmp_path):
    work = _workdir(tmp_path)
    config = ["--config", CONFIGS / "mnist1d/student.yaml", "--data.train_subset", "200",
              "--data.batches_per_step", "1"]
    fit = _cli(work, ["fit", *config, "--seed_everything", "0", "--trainer.max_epochs", "1",
                      "--trainer.logger.init_args.name", "s", "--test_after_fit", "false"])
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = work / "runs/s/version_0/checkpoints/last.ckpt"
    figures = {}
    for devices in (1, 3):
        # 111 per batch: rank 0 evaluates 334 examples in 4 batches, ranks 1 and 2 333 in 3
        test = _cli(work, ["test", *config, *_ddp(devices),
                           "--data.eval_batch_size", "111", "--ckpt_path", ckpt,
                           "--trainer.logger", "pytorch_lightning.loggers.CSVLogger",
                           "--trainer.logger.init_args.save_dir", f"eval{devices}"])
        assert test.returncode == 0, test.stderr[-3000:]
        figures[devices] = _csv_metrics(work / f"eval{devices}")
    one, three = figures[1], figures[3]
    assert 0.1 < one["test/acc"] < 1.0  # a briefly trained model: duplicates would show
    assert three["test/acc"] == one["test/acc"]
    assert three["test/errors"] == one["test/errors"]
    assert three["test/loss"] == pytest.approx(one["test/loss"], rel=1e-6)
