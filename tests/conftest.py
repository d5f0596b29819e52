"""Shared helpers: small data files in the genuine on-disk formats, CLI drivers."""

from __future__ import annotations

import os

import pickle
import sys
from unittest import mock
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

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


def run_cli(args: list[str]):
    """Run ``kd-lightning`` in-process; returns the LightningCLI object."""
    from kd_lightning.cli import cli_main

    with mock.patch.object(sys, "argv", ["kd-lightning"]):
        return cli_main([str(a) for a in args])


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
