"""Shared helpers: small data files in the genuine on-disk formats, CLI drivers (in process and
as a subprocess), the 2-process DDP harness, TensorBoard read-back."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# fast, quiet trainer settings for end-to-end CLI tests (one minibatch per Lightning step, so
# limit_train_batches counts minibatches; grouped steps have their own tests)
TINY = ["--data.batches_per_step", "1", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def write_mnist_idx(root: Path, folder: str = "MNIST", n_train: int = 60, n_test: int = 20,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write MNIST-format idx files (big-endian headers, uint8 payload) as torchvision reads them."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x00000803, n, 28, 28) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x00000801, n) + labels.tobytes())
        out[split] = (images, labels)
    return out["train"][0], out["train"][1]


def write_cifar(root: Path, num_classes: int = 10, n_train: int = 50, n_test: int = 20,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write CIFAR python-pickle batches (``data`` uint8 [N, 3072] in CHW order, labels list)."""
    rng = np.random.default_rng(seed)

    def dump(path: Path, obj) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    train = rng.integers(0, 256, size=(n_train, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    y_train = [i % num_classes for i in range(n_train)]
    y_test = [i % num_classes for i in range(n_test)]
    if num_classes == 10:
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True, exist_ok=True)
        chunks = np.array_split(np.arange(n_train), 5)
        for i, idx in enumerate(chunks, 1):
            dump(base / f"data_batch_{i}", {"data": train[idx], "labels": [y_train[j] for j in idx],
                                            "batch_label": f"training batch {i} of 5"})
        dump(base / "test_batch", {"data": test, "labels": y_test})
        dump(base / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True, exist_ok=True)
        dump(base / "train", {"data": train, "fine_labels": y_train, "coarse_labels": [0] * n_train})
        dump(base / "test", {"data": test, "fine_labels": y_test, "coarse_labels": [0] * n_test})
        dump(base / "meta", {"fine_label_names": [f"class{i}" for i in range(100)]})
    return train, np.asarray(y_train)


def write_image_folder(root: Path, classes: tuple[str, ...] = ("bird", "cat", "dog"),
                       per_class: tuple[int, ...] = (5, 4, 3), size: tuple[int, int] = (8, 8),
                       mode: str = "RGB", seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Write ``root/<class>/<class>_<i>.png`` images (torchvision's ImageFolder layout); returns
    each class's pixel arrays in file order (ImageFolder's order)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": (3,), "L": ()}[mode]
    out = {}
    for name, n in zip(classes, per_class):
        (root / name).mkdir(parents=True, exist_ok=True)
        out[name] = []
        for i in range(n):
            pixels = rng.integers(0, 256, size=(size[1], size[0], *channels), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{name}_{i:03d}.png")
            out[name].append(pixels)
    return out


def build_class_path(spec: dict) -> torch.nn.Module:
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def prepare_config(config: Path, workdir: Path) -> dict:
    """Write what a config needs into ``workdir``: fake CIFAR / MNIST files or image folders, and
    a teacher state_dict (random weights) at its ``teacher_checkpoint`` and ensemble members'."""
    cfg = yaml.safe_load(config.read_text())
    dataset = cfg.get("data", {}).get("dataset", "mnist1d")
    if isinstance(dataset, dict):  # an ImageFolder config: small PNG folders, one per class
        k = cfg["model"]["init_args"]["student"]["init_args"]["num_classes"]
        for split, n in (("train", 6), ("test", 2)):
            write_image_folder(workdir / dataset[split]["root"], tuple(f"c{i}" for i in range(k)),
                               (n,) * k, size=(12, 10))
        dataset = ""
    if dataset.startswith("cifar"):
        write_cifar(workdir / "data", 100 if dataset == "cifar100" else 10, n_train=200, n_test=40)
    if dataset in ("mnist", "fashion_mnist"):
        write_mnist_idx(workdir / "data", "MNIST" if dataset == "mnist" else "FashionMNIST",
                        n_train=200, n_test=40)
    init = cfg["model"]["init_args"]
    if init.get("teacher_checkpoint"):
        path = workdir / init["teacher_checkpoint"]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(build_class_path(init["teacher"]).state_dict(), path)  # plain state_dict path
    ensemble = init.get("teacher", {}).get("init_args", {})  # an EnsembleTeacher's members
    for member, ckpt in zip(ensemble.get("members") or [], ensemble.get("checkpoints") or []):
        if ckpt:
            (workdir / ckpt).parent.mkdir(parents=True, exist_ok=True)
            torch.save(build_class_path(member).state_dict(), workdir / ckpt)
    return cfg


def run_cli(args: list[str]):
    """Run ``kd-lightning`` in-process; returns the LightningCLI object."""
    from kd_lightning.cli import cli_main

    with mock.patch.object(sys, "argv", ["kd-lightning"]):
        return cli_main([str(a) for a in args])


def run_cli_in(folder: Path, args: list[str]):
    """:func:`run_cli` with ``folder`` as the working directory, restored after (for
    module-scoped fixtures, which cannot use ``monkeypatch.chdir``)."""
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        return run_cli(args)
    finally:
        os.chdir(cwd)


def run_cli_error(args: list[str], capsys) -> str:
    """Run ``kd-lightning`` expecting a configuration error (exit 2); returns stderr."""
    with pytest.raises(SystemExit) as exc:
        run_cli(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kd-lightning: error:")]
    assert len(lines) == 1, err  # one paragraph, on one line
    assert "Traceback" not in err
    return lines[0]


def run_cli_subprocess(args: list, cwd: Path, env: dict[str, str | None] | None = None,
                       timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python -m kd_lightning.cli <args>`` in ``cwd``, with the repository and ``cwd`` on the
    path (so a callback module written into ``cwd`` loads) and one OpenMP thread per process;
    ``env`` sets (or, with ``None``, removes) further variables. The run has its own process
    group, stopped when it returns: no DDP rank outlives the test, even after a kill or a
    timeout."""
    full_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{cwd}", "PYTHONWARNINGS": "ignore",
                "OMP_NUM_THREADS": "1"}
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    cmd = [sys.executable, "-m", "kd_lightning.cli", *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started: any rank left over
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_ddp(args: list, cwd: Path, callback: str, strategy: str = "ddp", devices: int = 2,
            timeout: float = 900) -> tuple[list[dict], subprocess.CompletedProcess]:
    """``kd-lightning <args>`` as ``devices`` CPU processes under ``strategy`` (gloo), with the
    callback defined in the Python source ``callback`` (one ``pytorch_lightning.Callback``
    subclass that writes what each process has to compare into ``rank<global_rank>.json`` in the
    working directory) added to the trainer. Asserts the run succeeded; returns every rank's JSON,
    in rank order, and the finished process."""
    name = re.search(r"^class (\w+)\(", callback, re.M).group(1)
    (cwd / "ddp_dump.py").write_text(callback)
    out = run_cli_subprocess([*args, "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
                              "--trainer.strategy", strategy, f"--trainer.callbacks+=ddp_dump.{name}"],
                             cwd, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads((cwd / f"rank{r}.json").read_text()) for r in range(devices)], out


#: a DDP callback: each rank's optimizer step count and the sum of each student parameter
DUMP_WEIGHTS = '''
import json, os
from pytorch_lightning import Callback

class DumpWeights(Callback):
    def on_train_end(self, trainer, pl_module):
        path = os.path.join(os.getcwd(), f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump({"step": trainer.global_step,
                       "weights": [float(p.double().sum()) for p in pl_module.student.parameters()]}, f)
'''


def tb_scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar series TensorBoard would show for a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(autouse=True)
def _quiet_and_seeded():
    torch.manual_seed(0)
    yield
    # an in-process distributed run leaves its rendezvous port in the environment; a later DDP
    # subprocess would inherit it and fail to bind it (EADDRINUSE) instead of choosing a free one
    for var in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        os.environ.pop(var, None)


@pytest.fixture(scope="session")
def mnist1d_teacher(tmp_path_factory) -> Path:
    """A plain state_dict of the MNIST-1D configs' teacher architecture (ConvNet1D width 64,
    random weights): enough for runs that test plumbing, not accuracy."""
    from kd_lightning.models import ConvNet1D

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    torch.save(ConvNet1D(num_classes=10, width=64).state_dict(), path)
    return path


def assert_mnist1d_config_refused(config: str, extra: list[str], messages: list[str], teacher: str,
                                  tmp_path: Path, monkeypatch, capsys) -> None:
    """``kd-lightning fit`` of ``configs/mnist1d/<config>`` with ``extra`` stops with one error
    containing every message, before any checkpoint is written."""
    monkeypatch.chdir(tmp_path)
    err = run_cli_error(["fit", "--config", CONFIGS / "mnist1d" / config, *TINY,
                         "--model.init_args.teacher_checkpoint", teacher, *extra], capsys)
    for message in messages:
        assert message in err
    assert not list(tmp_path.rglob("*.ckpt"))


# ---- small tensors shared by the loss and method tests ----------------------------------------
F64 = torch.float64


def t32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def unlabelled_batch(n=8, k=10, unlabelled=(1, 4, 5), seed=0):
    """``(x, y, y_true, index)``: an MNIST-1D-shaped batch whose rows ``unlabelled`` carry
    ``y = UNLABELLED``; ``y_true`` keeps their drawn labels."""
    from kd_lightning.losses.labels import UNLABELLED

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 40, generator=g)
    y_true = torch.randint(0, k, (n,), generator=g)
    y = y_true.clone()
    y[list(unlabelled)] = UNLABELLED
    return x, y, y_true, torch.arange(n)
