"""Any dataset by class_path: ImageFolder, torchvision FakeData, a researcher's own class, MNIST and
Fashion-MNIST through torchvision's classes; in memory or read per sample; bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule, load_source
from kd_lightning.data.custom import LazyExamples
from kd_lightning.losses.labels import UNLABELLED
from tests.conftest import TINY, run_cli, run_cli_error, write_image_folder

DATA_ROOT = Path(os.environ.get("KD_DATA_ROOT", "data"))
CLASSES = ("bird", "cat", "dog")


@pytest.fixture
def folders(tmp_path):
    """An ImageFolder train split (bird 12, cat 9, dog 6 PNGs of 8x6 RGB) and a test split."""
    train = write_image_folder(tmp_path / "imgs" / "train", CLASSES, (12, 9, 6), size=(8, 6), seed=1)
    test = write_image_folder(tmp_path / "imgs" / "test", CLASSES, (3, 2, 2), size=(8, 6), seed=2)
    return tmp_path / "imgs", train, test


def image_folder(root: Path, **extra) -> dict:
    return {"class_path": "torchvision.datasets.ImageFolder",
            "train": {"root": str(root / "train")}, "test": {"root": str(root / "test")}, **extra}


def fake_data(train_size=60, test_size=20, **extra) -> dict:
    common = {"image_size": [3, 8, 8], "num_classes": 4}
    return {"class_path": "torchvision.datasets.FakeData", "init_args": common,
            "train": {"size": train_size}, "test": {"size": test_size, "random_offset": 10_000},
            **extra}


def all_batches(loader) -> list:
    torch.manual_seed(123)  # the RandomSampler draws its permutation from the global generator
    return [[t.clone() for t in batch] for batch in loader]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) and len(a) > 0
    for batch_a, batch_b in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(batch_a, batch_b))


# ---- ImageFolder --------------------------------------------------------------------------
def test_image_folder_pixels_labels_and_classes(folders):
    root, train, test = folders
    dm = DistillDataModule(image_folder(root), val_split=0)
    assert dm.num_classes == 3 and dm.input_shape == (3, 6, 8)
    s = dm.splits()
    # ImageFolder's order: classes sorted, files sorted within a class
    expected = [(c, px) for c in CLASSES for px in train[c]]
    assert s.y_train.tolist() == [CLASSES.index(c) for c, _ in expected]
    assert s.x_train.dtype == torch.uint8
    for i, (_, px) in enumerate(expected):
        assert torch.equal(s.x_train[i], torch.from_numpy(px).permute(2, 0, 1))
    assert s.y_test.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert s.class_names == CLASSES
    # normalize: standard uses the training pixels' own per-channel statistics
    all_px = np.stack([px for _, px in expected]).astype(np.float64) / 255
    assert np.allclose(s.mean, all_px.mean(axis=(0, 1, 2)), atol=1e-10)
    assert np.allclose(s.std, all_px.std(axis=(0, 1, 2)), atol=1e-10)
    dm.setup("fit")
    x, y, idx = dm.train_dataset.get_batch(torch.arange(5))
    want = (s.x_train[idx].double() / 255 - torch.tensor(s.mean)[:, None, None]) / torch.tensor(s.std)[:, None, None]
    assert torch.allclose(x.double(), want, atol=1e-5)


def test_image_folder_labels_are_read_without_decoding_images(folders):
    root, _, _ = folders
    from torchvision.datasets.folder import default_loader

    opened = []

    def counting_loader(path):
        opened.append(path)
        return default_loader(path)

    # (normalize: standard would read training images for the pixel statistics)
    dm = DistillDataModule(image_folder(root, init_args={"loader": counting_loader},
                                        memory_budget_mb=0), train_subset=6, val_split=0,
                           normalize="unit")
    dm.setup("fit")
    assert len(opened) == 2  # the first example of each split (shape and dtype), nothing else
    assert not dm._custom.in_memory and isinstance(dm.splits().x_train, LazyExamples)
    assert np.bincount(dm.splits().y_train[dm.train_indices].numpy()).tolist() == [2, 2, 2]


def test_images_of_different_sizes_are_refused_with_the_fix(tmp_path):
    write_image_folder(tmp_path / "train", ("a", "b"), (2, 2), size=(8, 8))
    write_image_folder(tmp_path / "train", ("c",), (2,), size=(9, 8))
    write_image_folder(tmp_path / "test", ("a", "b", "c"), (1, 1, 1), size=(8, 8))
    with pytest.raises(KDConfigError, match=r"example 4 of the train split.*shape \[3, 8, 9\].*Resize"):
        DistillDataModule(image_folder(tmp_path), val_split=0)
    # a transform in init_args (a nested class_path) makes them one size
    resize = {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [5, 5]}}
    dm = DistillDataModule(image_folder(tmp_path, init_args={"transform": resize}), val_split=0)
    assert dm.input_shape == (3, 5, 5) and len(dm.splits().y_train) == 6


# ---- torchvision FakeData -----------------------------------------------------------------
def test_a_transform_giving_float_tensors_is_used_as_it_is():
    to_float = {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": [
        {"class_path": "torchvision.transforms.v2.ToImage"},
        {"class_path": "torchvision.transforms.v2.ToDtype",
         "init_args": {"dtype": "float32", "scale": True}}]}}
    as_uint8 = DistillDataModule(fake_data(), val_split=0).splits()
    spec = fake_data()
    spec["init_args"] = {**spec["init_args"], "transform": to_float}
    as_float = DistillDataModule(spec, val_split=0)
    as_float.setup("fit")
    x, _, idx = as_float.train_dataset.get_batch(torch.arange(10))
    assert x.dtype == torch.float32 and type(x) is torch.Tensor
    assert torch.allclose(x, as_uint8.x_train[idx].float() / 255)


def test_fake_data_labels_by_iteration_and_num_classes_from_the_class():
    import torchvision

    dm = DistillDataModule(fake_data(), val_split=0)
    ref = torchvision.datasets.FakeData(size=60, image_size=(3, 8, 8), num_classes=4)
    assert dm.num_classes == 4 and dm.input_shape == (3, 8, 8)
    assert dm.splits().y_train.tolist() == [int(ref[i][1]) for i in range(60)]
    assert torch.equal(dm.splits().x_train[7],
                       torch.from_numpy(np.array(ref[7][0])).permute(2, 0, 1))
    # num_classes can be overridden (e.g. classes the split does not show)
    assert DistillDataModule(fake_data(num_classes=7), val_split=0).num_classes == 7


def test_fake_data_in_memory_and_per_sample_give_the_same_batches():
    kw = dict(batch_size=7, train_subset=20, val_split=0.25, unlabelled=10, subset_seed=3)
    mem = DistillDataModule(fake_data(), **kw)
    lazy = DistillDataModule(fake_data(memory_budget_mb=0), **kw)
    assert mem._custom.in_memory and not lazy._custom.in_memory
    assert mem.splits().mean == lazy.splits().mean and mem.splits().std == lazy.splits().std
    for dm in (mem, lazy):
        dm.setup("fit")
        dm.setup("test")
    assert lazy.train_dataloader().num_workers > 0  # per sample: worker processes
    assert lazy.train_dataloader().persistent_workers
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        assert_same_batches(all_batches(getattr(mem, name)()), all_batches(getattr(lazy, name)()))
    batches = all_batches(mem.train_dataloader())
    y = torch.cat([b[1] for b in batches])
    assert (y == UNLABELLED).sum() == 10 and len(y) == 30


def test_grouped_steps_and_the_regular_collate_path_agree_on_per_sample_data():
    kw = dict(batch_size=8, val_split=0.2)
    mem = DistillDataModule(fake_data(), **kw)
    lazy = DistillDataModule(fake_data(memory_budget_mb=0), batched=False, num_workers=1, **kw)
    grouped = DistillDataModule(fake_data(memory_budget_mb=0), batches_per_step=3, num_workers=1, **kw)
    for dm in (mem, lazy, grouped):
        dm.setup("fit")
    a = all_batches(mem.train_dataloader())
    assert_same_batches(a, all_batches(lazy.train_dataloader()))
    torch.manual_seed(123)
    flat = [[t.clone() for t in mb] for group in grouped.train_dataloader() for mb in group]
    assert_same_batches(a, flat)


def test_per_sample_data_shards_like_in_memory_data_under_ddp():
    """Lightning swaps a DistributedSampler into the loaders; each rank gets the same examples on
    both paths, and the two ranks split the training examples between them."""
    from pytorch_lightning.utilities.data import _update_dataloader

    mem = DistillDataModule(fake_data(), batch_size=8, val_split=0.2)
    lazy = DistillDataModule(fake_data(memory_budget_mb=0), batch_size=8, val_split=0.2, num_workers=1)
    seen = {}
    for dm in (mem, lazy):
        dm.setup("fit")
        for rank in (0, 1):
            loader = dm.train_dataloader()
            sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=4)
            sampler.set_epoch(2)
            sharded = _update_dataloader(loader, sampler)
            assert sharded.num_workers == loader.num_workers
            seen[dm is lazy, rank] = torch.cat([b[2] for b in sharded]).tolist()
    assert seen[False, 0] == seen[True, 0] and seen[False, 1] == seen[True, 1]
    assert sorted(seen[False, 0] + seen[False, 1]) == mem.train_indices.tolist()


# ---- a dataset class of one's own, beside the config ---------------------------------------
MY_DATA = '''
import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    """Float examples [1, 6, 6]: class c lights pixel row c."""

    def __init__(self, n=40, seed=0, classes=3):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % classes
        self.x = torch.rand(n, 1, 6, 6, generator=g) * 0.1
        self.x[torch.arange(n), 0, self.y] += 1.0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])
'''


def write_my_config(folder: Path, **data) -> Path:
    (folder / "my_data.py").write_text(MY_DATA)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1,
                    "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "runs", "name": "blobs"}}},
        "model": {"class_path": "kd_lightning.methods.Supervised", "init_args": {
            "student": {"class_path": "kd_lightning.models.MLP",
                        "init_args": {"input_dim": 36, "hidden_dims": [16], "num_classes": 3}},
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}}}},
        "data": {"dataset": {"class_path": "my_data.Blobs", "train": {"n": 60, "seed": 0},
                             "test": {"n": 30, "seed": 1}},
                 "batch_size": 8, "val_split": 0.2, **data},
    }
    path = folder / "blobs.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_own_dataset_class_beside_the_config_fits_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_my_config(tmp_path, train_subset=12)
    cli = run_cli(["fit", "--config", config, *TINY, "--trainer.max_epochs", "3",
                   "--trainer.limit_train_batches", "4"])
    assert cli.trainer.global_step == 6  # 12 examples / batch 8 = 2 steps per epoch, 3 epochs
    assert cli.model.num_classes == 3  # linked from the data module
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
    saved = json.loads((Path(cli.trainer.log_dir) / "train_subset.json").read_text())
    assert saved["dataset"]["class_path"] == "my_data.Blobs" and saved["num_examples"] == 12
    y = cli.datamodule.splits().y_train
    assert np.bincount(y[saved["indices"]].numpy()).tolist() == [4, 4, 4]
    # float examples are used as they are (no pixel scaling)
    x, _, idx = cli.datamodule.train_dataset.get_batch(torch.arange(3))
    import my_data

    assert torch.equal(x, my_data.Blobs(n=60, seed=0).x[idx])


def test_cli_overrides_nested_dataset_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_my_config(tmp_path)
    # a nested mapping in YAML flow style (a single leaf, --data.dataset.train.n 30, is a string)
    cli = run_cli(["fit", "--config", config, *TINY, "--data.dataset.train", "{n: 45, seed: 2}",
                   "--test_after_fit", "false"])
    assert len(cli.datamodule.splits().y_train) == 45 and len(cli.datamodule.splits().y_test) == 30
    import my_data

    assert torch.equal(cli.datamodule.splits().x_train, my_data.Blobs(n=45, seed=2).x)


# ---- subsets and validation split ----------------------------------------------------------
def test_subset_and_val_split_are_source_positions(folders):
    root, _, _ = folders
    dm = DistillDataModule(image_folder(root), train_subset=9, val_split=6, subset_seed=2,
                           batch_size=4)
    dm.setup("fit")
    s = dm.splits()
    assert len(dm.val_indices) == 6 and not set(dm.val_indices) & set(dm.train_indices)
    assert np.bincount(s.y_train[dm.train_indices].numpy(), minlength=3).tolist() == [3, 3, 3]
    for x, y, idx in dm.train_dataloader():
        assert torch.equal(y, s.y_train[idx]) and set(idx.tolist()) <= set(dm.train_indices.tolist())
        assert torch.equal(x, dm.train_dataset.get_batch(
            torch.searchsorted(dm.train_dataset.indices, idx))[0])
    # the same draw as any data set with these labels: a pure function of (labels, M, seed)
    again = DistillDataModule(image_folder(root, memory_budget_mb=0), train_subset=9, val_split=6,
                              subset_seed=2)
    assert np.array_equal(again.train_indices, dm.train_indices)


def test_subset_larger_than_a_class_names_the_class_and_its_count(folders):
    root, _, _ = folders
    # dog has 6 training images; 27 over 3 classes asks 9 of each
    with pytest.raises(KDConfigError, match=r"9 examples of class 2 \('dog'\).*has only 6"):
        DistillDataModule(image_folder(root), train_subset=27, val_split=0)


# ---- bad input -----------------------------------------------------------------------------
class OnlyImages(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(1, 4, 4)


class Words(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return "a word", i % 2


class NoSplit(Dataset):
    def __init__(self, n=4):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(2), i % 2


@pytest.mark.parametrize("spec, message", [
    ({"class_path": "tests.data.test_custom.OnlyImages", "train": {}, "test": {}},
     "example 0 of the train split of OnlyImages is a single Tensor, not \\(x, y\\): the dataset returns no labels"),
    ({"class_path": "tests.data.test_custom.Words", "train": {}, "test": {}},
     "example 0 of the train split of Words is a builtins.str, not an image or a tensor"),
    ({"class_path": "no_such_module.Data"}, "cannot import dataset class_path 'no_such_module.Data'"),
    ({"class_path": "torchvision.datasets.NoSuchSet"}, "module 'torchvision.datasets' has no attribute 'NoSuchSet'"),
    ({"class_path": "tests.data.test_custom.NoSplit"}, "say how tests.data.test_custom.NoSplit builds its train split"),
    ({"class_path": "torchvision.datasets.ImageFolder", "train": {"root": "/nonexistent/x"},
      "test": {"root": "/nonexistent/y"}}, "building the train split as torchvision.datasets.ImageFolder"),
    ({"class_path": "tests.data.test_custom.NoSplit", "train": {}, "test": {}, "shuffle": True},
     "unknown key\\(s\\) \\['shuffle'\\]"),
    ({"class_path": "tests.data.test_custom.NoSplit", "train": {}, "test": {}, "num_classes": 1},
     "num_classes=1"),
])
def test_bad_datasets_are_refused_with_one_clear_message(spec, message):
    with pytest.raises(KDConfigError, match=message):
        DistillDataModule(spec)


def test_labels_outside_the_classes_are_refused(folders):
    root, _, _ = folders
    with pytest.raises(KDConfigError, match=r"labels of ImageFolder run from 0 to 2, outside 0 \.\. 1"):
        DistillDataModule(image_folder(root, num_classes=2))


def test_pixel_scaling_of_float_examples_is_refused(tmp_path):
    spec = {"class_path": "tests.data.test_custom.NoSplit", "train": {}, "test": {}}
    with pytest.raises(KDConfigError, match="normalize=unit scales 8-bit pixels"):
        DistillDataModule(spec, normalize="unit")


@pytest.mark.parametrize("dataset, message", [
    ({"class_path": "my_data.Missing", "train": {}, "test": {}}, "module 'my_data' has no attribute 'Missing'"),
    ({"class_path": "not_there.Blobs"}, "cannot import dataset class_path 'not_there.Blobs'"),
    ({"class_path": "tests.data.test_custom.OnlyImages", "train": {}, "test": {}}, "returns no labels"),
])
def test_cli_refuses_a_bad_dataset_before_anything_is_written(dataset, message, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(tmp_path)
    config = write_my_config(tmp_path)
    line = run_cli_error(["fit", "--config", config, *TINY, "--data.dataset", json.dumps(dataset)], capsys)
    assert message in line
    assert not list(tmp_path.glob("runs/**/version_*"))  # no run folder, no checkpoint


# ---- MNIST and Fashion-MNIST through torchvision's own classes ------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("cls, name, folder", [("MNIST", "mnist", "MNIST"),
                                               ("FashionMNIST", "fashion_mnist", "FashionMNIST")])
def test_real_mnist_by_class_path_equals_the_built_in_set(cls, name, folder):
    raw = DATA_ROOT / folder / "raw"
    # real data stays out of the repository: this runs where the files were prepared, else skips
    if not (raw / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"{cls} idx files not found in {raw} (scripts/prepare_real_data.py writes them)")
    spec = {"class_path": f"torchvision.datasets.{cls}", "init_args": {"root": str(DATA_ROOT)}}
    dm = DistillDataModule(spec, train_subset=100, batch_size=32)
    built_in = load_source(name, str(DATA_ROOT))
    s = dm.splits()
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28) and len(s.y_train) == 60_000
    assert torch.equal(s.x_train, built_in.x_train) and torch.equal(s.y_train, built_in.y_train)
    assert torch.equal(s.x_test, built_in.x_test) and torch.equal(s.y_test, built_in.y_test)
    # the statistics of 10,000 evenly spaced training images are near the published ones
    assert abs(s.mean[0] - built_in.mean[0]) < 2e-3 and abs(s.std[0] - built_in.std[0]) < 2e-3
    # read per sample: labels from `targets` (no image decoded), the same batches
    lazy = DistillDataModule({**spec, "memory_budget_mb": 0}, train_subset=100, batch_size=32,
                             num_workers=1)
    assert np.array_equal(lazy.train_indices, dm.train_indices)
    assert lazy.splits().mean == s.mean and lazy.splits().std == s.std
    for d in (dm, lazy):
        d.setup("fit")
    assert_same_batches(all_batches(dm.train_dataloader()), all_batches(lazy.train_dataloader()))


@pytest.mark.parametrize("budget_mb", [2048, 0], ids=["in_memory", "per_sample"])
def test_a_dataset_by_class_path_trains_with_a_transform_list_and_mixup(budget_mb, tmp_path,
                                                                          monkeypatch):
    """Augmentation and mixing work on a dataset given by class_path, on both loading paths, and
    in the first epoch both paths train the same student (same examples, same random draws; the
    per-sample path's persistent workers take their seed from the global generator once per run,
    not once per epoch, so the augmentation draws of later epochs differ between the paths)."""
    monkeypatch.chdir(tmp_path)
    augment = [{"class_path": "torchvision.transforms.v2.RandomCrop",
                "init_args": {"size": 8, "padding": 1}}, "crop_flip"]
    config = {
        "seed_everything": 0,
        "model": {"class_path": "kd_lightning.methods.Supervised", "init_args": {
            "student": {"class_path": "kd_lightning.models.MLP",
                        "init_args": {"input_dim": 192, "hidden_dims": [16], "num_classes": 4}},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}}},
        "data": {"dataset": fake_data(memory_budget_mb=budget_mb), "batch_size": 10,
                 "val_split": 0, "augment": augment, "mixup": 0.4},
    }
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run_cli(["fit", "--config", path, *TINY, "--trainer.max_epochs", "1",
                   "--trainer.limit_train_batches", "1.0", "--data.num_workers", "0"])
    assert cli.trainer.global_step == 6  # 60 examples / batch 10
    assert cli.datamodule.deterministic_train is False  # the teacher cache would be off
    weights = torch.cat([p.detach().flatten() for p in cli.model.student.parameters()])
    assert torch.isfinite(weights).all()
    reference = tmp_path.parent / "class_path_aug_mixup_weights.pt"
    if reference.exists():  # the other loading path ran first: the same student
        assert torch.equal(torch.load(reference), weights)
    else:
        torch.save(weights, reference)
