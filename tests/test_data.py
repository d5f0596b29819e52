import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import (DistillDataModule, IndexedTensorDataset, load_source,
                               random_crop_flip, stratified_subset, train_val_split)
from tests.conftest import write_cifar, write_mnist_idx


def _labels(n_per_class=(30, 30, 30, 12)):
    return np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])


# ---- subset sampling --------------------------------------------------------------------
def test_stratified_subset_is_balanced_and_seeded():
    y = np.random.default_rng(3).permutation(_labels((50, 50, 50, 50)))
    idx = stratified_subset(y, 20, seed=7)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert np.bincount(y[idx], minlength=4).tolist() == [5, 5, 5, 5]
    assert np.array_equal(idx, stratified_subset(y, 20, seed=7))  # pure function
    assert not np.array_equal(idx, stratified_subset(y, 20, seed=8))
    assert np.all(np.diff(idx) > 0)


def test_stratified_subset_remainder_spread_one_per_class():
    y = _labels((40, 40, 40, 40))
    counts = np.bincount(y[stratified_subset(y, 10, seed=1)], minlength=4)
    assert counts.sum() == 10 and counts.max() - counts.min() <= 1


def test_stratified_subset_identical_in_another_process():
    """The draw is the same in any process (as on every DDP rank): no global RNG involved."""
    y = np.random.default_rng(0).integers(0, 10, 500)
    np.random.seed(123)
    torch.manual_seed(123)
    here = stratified_subset(y, 50, seed=4).tolist()
    path = Path(__file__).resolve().parents[1] / "kd_lightning" / "data" / "subset.py"
    code = ("import importlib.util as u, numpy as np;"
            f"s=u.spec_from_file_location('subset', r'{path}'); m=u.module_from_spec(s);"
            "s.loader.exec_module(m); stratified_subset=m.stratified_subset;"
            "y=np.random.default_rng(0).integers(0,10,500); np.random.seed(999);"
            "print(stratified_subset(y,50,seed=4).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(here)


@pytest.mark.parametrize("m, match", [(3, "smaller than the number of classes"),
                                      (1000, "larger than the training set"),
                                      (60, "examples of class 3")])
def test_stratified_subset_bad_sizes(m, match):
    with pytest.raises(KDConfigError, match=match):
        stratified_subset(_labels(), m, seed=0)


def test_train_val_split_disjoint_and_seeded():
    tr, va = train_val_split(100, 0.2, seed=5)
    assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va)
    assert np.array_equal(va, train_val_split(100, 0.2, seed=5)[1])
    with pytest.raises(KDConfigError):
        train_val_split(100, 1.5)


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


def test_batched_path_yields_same_examples_as_per_sample_loader():
    batches = {}
    for batched in (True, False):
        dm = DistillDataModule("digits", batch_size=50, train_subset=200, batched=batched)
        dm.setup("fit")
        torch.manual_seed(11)
        batches[batched] = [b for b in dm.train_dataloader()]
    assert len(batches[True]) == len(batches[False]) == 4
    for (xa, ya, ia), (xb, yb, ib) in zip(batches[True], batches[False]):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.allclose(xa, xb)


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


def test_augmentation_crops_and_flips_per_example():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = random_crop_flip(x.repeat(64, 1, 1, 1), padding=2)
    assert out.shape == (128, 3, 8, 8)
    assert len({tuple(o.flatten().tolist()) for o in out[::2]}) > 5  # different crops/flips
    # with zero padding/flip off, the image is unchanged
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    # every output pixel comes from the image or the zero padding
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_dataset_index_refers_to_source_rows():
    x = torch.arange(10, dtype=torch.float32).view(10, 1)
    ds = IndexedTensorDataset(x, torch.arange(10), indices=[7, 2, 5])
    xb, yb, ib = ds.__getitems__([0, 2])
    assert ib.tolist() == [7, 5] and xb[:, 0].tolist() == [7.0, 5.0] and yb.tolist() == [7, 5]


def test_batched_path_shards_like_the_regular_loader_under_ddp():
    """Lightning swaps in a DistributedSampler; both paths must give each rank the same examples."""
    from torch.utils.data import DataLoader, DistributedSampler

    from kd_lightning.data.dataset import PerSampleDataset, batch_collate

    dm = DistillDataModule("digits", batch_size=32, train_subset=300)
    dm.setup("fit")
    for rank in (0, 1):
        seen = {}
        for batched in (True, False):
            sampler = DistributedSampler(dm.train_dataset, num_replicas=2, rank=rank, shuffle=True, seed=4)
            sampler.set_epoch(3)
            ds = dm.train_dataset if batched else PerSampleDataset(dm.train_dataset)
            loader = DataLoader(ds, batch_size=32, sampler=sampler,
                                collate_fn=batch_collate if batched else None)
            seen[batched] = torch.cat([b[2] for b in loader]).tolist()
        assert seen[True] == seen[False] and len(seen[True]) == 150
