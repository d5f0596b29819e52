"""Data sources: MNIST-1D, digits, the torchvision files (MNIST idx, CIFAR pickles), and the
messages for missing or unknown data."""

import numpy as np
import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule, load_source
from tests.conftest import write_cifar, write_mnist_idx


# ---- the data module --------------------------------------------------------------------
def test_mnist1d_matches_published_shapes_and_yields_indexed_batches():
    s = load_source("mnist1d")
    assert s.x_train.shape == (4000, 1, 40) and s.x_test.shape == (1000, 1, 40)
    dm = DistillDataModule("mnist1d", batch_size=32, train_subset=100, subset_seed=2)
    dm.setup("fit")
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 40) and x.dtype == torch.float32
    assert torch.equal(s.x_train[idx], x) and torch.equal(s.y_train[idx], y)
    assert len(dm.train_dataset) == 100
    assert set(dm.train_indices.tolist()).isdisjoint(dm.val_dataset.indices.tolist())
    assert np.bincount(s.y_train[dm.train_indices].numpy()).tolist() == [10] * 10
    assert dm.num_classes == 10 and dm.input_shape == (1, 40)


def test_digits_is_normalised_images():
    dm = DistillDataModule("digits")
    dm.setup("fit")
    x = dm.train_dataset.get_batch(torch.arange(len(dm.train_dataset)))[0]
    assert x.shape[1:] == (1, 8, 8)
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files_are_read_by_torchvision(tmp_path, name, folder):
    images, labels = write_mnist_idx(tmp_path, folder, n_train=60, n_test=20)
    s = load_source(name, str(tmp_path))
    assert s.x_train.shape == (60, 1, 28, 28) and s.x_train.dtype == torch.uint8
    assert np.array_equal(s.x_train[:, 0].numpy(), images)
    assert np.array_equal(s.y_train.numpy(), labels)
    dm = DistillDataModule(name, root=str(tmp_path), batch_size=10, val_split=10)
    dm.setup("fit")
    dm.setup("test")
    x, y, idx = next(iter(dm.train_dataloader()))
    expected = (torch.from_numpy(images[idx.numpy()]).float() / 255 - s.mean[0]) / s.std[0]
    assert torch.allclose(x[:, 0], expected, atol=1e-5)
    assert len(dm.test_dataset) == 20


@pytest.mark.parametrize("k", [10, 100])
def test_cifar_pickles_are_read_by_torchvision(tmp_path, k):
    data, labels = write_cifar(tmp_path, k, n_train=200 if k == 100 else 50, n_test=20)
    name = "cifar10" if k == 10 else "cifar100"
    s = load_source(name, str(tmp_path))
    n = len(labels)
    assert s.x_train.shape == (n, 3, 32, 32) and s.num_classes == k
    # pickled rows are CHW-flattened; the loader must give back the same pixels
    assert np.array_equal(s.x_train.reshape(n, -1).numpy(), data)
    assert np.array_equal(s.y_train.numpy(), labels)


def test_missing_torchvision_data_says_where_and_how(tmp_path):
    with pytest.raises(KDConfigError) as err:
        load_source("cifar10", str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "download" in msg and "nowhere" in msg


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(KDConfigError, match="mnist1d.*|.*digits"):
        DistillDataModule("imagenet")
