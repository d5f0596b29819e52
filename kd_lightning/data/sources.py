"""Dataset sources: each returns the whole train and test split as in-memory tensors.

All supported data sets fit in memory, so the data path indexes tensors instead of collating
samples one by one. Image sets are kept as ``uint8`` and normalised per batch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kd_lightning import KDConfigError


@dataclass
class Splits:
    """A data set held in memory.

    ``x_*`` are ``float32`` (already normalised) or ``uint8`` (normalised per batch with
    ``mean``/``std`` after scaling by 1/255).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# --------------------------------------------------------------------------------------------
# MNIST-1D (Greydanus & Kobak) -- generated locally, never downloaded


@functools.lru_cache(maxsize=2)
def _mnist1d_arrays(root: str | None) -> dict[str, np.ndarray]:
    cache = Path(root) / "mnist1d" / "mnist1d_generated.npz" if root else None
    if cache is not None and cache.is_file():
        with np.load(cache) as f:
            return {k: f[k] for k in f.files}
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset with the default arguments reproduces the published frozen file exactly.
    d = make_dataset(get_dataset_args())
    arrays = {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, cache)
        except OSError:  # read-only root: just regenerate next time
            pass
    return arrays


def load_mnist1d(root: str | None = "data", download: bool = False) -> Splits:
    a = _mnist1d_arrays(root)
    to_x = lambda v: torch.from_numpy(v.astype(np.float32)).unsqueeze(1)  # [N, 1, 40]
    to_y = lambda v: torch.from_numpy(v.astype(np.int64))
    return Splits("mnist1d", to_x(a["x"]), to_y(a["y"]), to_x(a["x_test"]), to_y(a["y_test"]), 10)


# --------------------------------------------------------------------------------------------
# scikit-learn's bundled 8x8 digits


def load_digits(root: str | None = "data", download: bool = False) -> Splits:
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    d = _load()
    x = d.images.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    # digits has no official test split: a fixed stratified 80/20 split (random_state=0).
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    norm = lambda v: torch.from_numpy((v - mean) / std).unsqueeze(1)  # [N, 1, 8, 8]
    return Splits("digits", norm(x_tr), torch.from_numpy(y_tr), norm(x_te), torch.from_numpy(y_te), 10)


# --------------------------------------------------------------------------------------------
# torchvision sets (real loaders; files must be present unless download=True)

_TV = {
    # name: (torchvision class, folder, num_classes, mean, std, how to get the files)
    "mnist": ("MNIST", "MNIST/raw", 10, (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", 10, (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10,
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", "cifar-100-python", 100,
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _presence_checked(cls):
    """A torchvision CIFAR class that checks its files are present instead of their MD5 sums.

    torchvision re-hashes the whole archive on every load (and a test cannot write files with
    the published MD5s); a truncated or corrupted file still fails loudly when it is unpickled.
    Parsing is torchvision's own code. With ``download=True`` torchvision's MD5 check is kept.
    """
    import pickle

    class Checked(cls):
        def _check_integrity(self) -> bool:
            if self._kd_download:
                return super()._check_integrity()
            base = Path(self.root) / self.base_folder
            return all((base / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise RuntimeError(f"metadata file {path} not found")
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        def __init__(self, *args, download: bool = False, **kwargs) -> None:
            self._kd_download = download
            super().__init__(*args, download=download, **kwargs)

    Checked.__name__ = cls.__name__
    return Checked


def _load_torchvision(name: str, root: str | None, download: bool) -> Splits:
    import torchvision.datasets as tvd

    cls_name, folder, k, mean, std = _TV[name]
    cls = getattr(tvd, cls_name)
    if name.startswith("cifar"):
        cls = _presence_checked(cls)
    root = root or "data"
    try:
        train = cls(root=root, train=True, download=download)
        test = cls(root=root, train=False, download=download)
    except RuntimeError as err:
        where = Path(root).resolve() / folder
        raise KDConfigError(
            f"dataset '{name}' was not found: torchvision looked in {where} ({err}). This machine "
            f"cannot download at run time unless it has a network: either put the original "
            f"{cls_name} files there (point --data.root at their parent folder), or pass "
            f"--data.download true on a machine with internet access.") from None

    def arrays(ds) -> tuple[Tensor, Tensor]:
        data = ds.data
        x = torch.as_tensor(np.asarray(data))
        if x.ndim == 3:  # MNIST-style [N, H, W]
            x = x.unsqueeze(1)
        else:  # CIFAR [N, H, W, C]
            x = x.permute(0, 3, 1, 2)
        y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
        return x.contiguous().to(torch.uint8), y

    x_tr, y_tr = arrays(train)
    x_te, y_te = arrays(test)
    return Splits(name, x_tr, y_tr, x_te, y_te, k, mean, std)


SOURCES = {
    "mnist1d": load_mnist1d,
    "digits": load_digits,
    **{name: functools.partial(_load_torchvision, name) for name in _TV},
}


def load_source(name: str, root: str | None = "data", download: bool = False) -> Splits:
    """Load data set ``name`` (one of :data:`SOURCES`) into memory."""
    if name not in SOURCES:
        raise KDConfigError(
            f"unknown dataset '{name}'. Valid names: {', '.join(sorted(SOURCES))}.")
    if name in ("mnist1d", "digits"):
        return SOURCES[name](root=root)
    return SOURCES[name](root, download)
