"""Any map-style dataset as a data source: a torchvision dataset class, ``ImageFolder``, or a
researcher's own class, given by ``class_path`` + ``init_args``.

``DistillDataModule(dataset={...})`` takes a mapping (in YAML, under ``data.dataset``)::

    class_path: torchvision.datasets.ImageFolder   # any map-style dataset returning (x, y)
    init_args: {}                                  # keyword arguments shared by both splits
    train: {root: my_data/train}                   # ... and those of the training split
    test: {root: my_data/test}                     # ... and those of the test split
    num_classes: null                              # optional: overrides what is read
    mean: null                                     # optional: per-channel statistics of [0, 1]
    std: null                                      #   pixels for normalize: standard
    memory_budget_mb: 2048                         # held in memory up to this size

Without ``train``/``test``, a class whose constructor takes ``train`` (MNIST, CIFAR, ...) gets
``train=True`` / ``train=False`` and one that takes ``split`` (SVHN, ...) ``split="train"`` /
``split="test"``. Nested ``{class_path, init_args}`` mappings in the arguments (e.g. a
``transform``) are instantiated.

Examples are converted as the built-in image sets are held: a PIL image becomes a ``uint8``
``[C, H, W]`` tensor (scaled per batch as ``data.normalize`` says, with the training split's
per-channel mean/std for ``standard``); a ``uint8`` tensor is kept; a float tensor or array is
used as it is (``float32``). Labels are read from the dataset's ``targets``, ``samples``/``imgs``
(``ImageFolder``) or ``labels`` attribute when it has one (and no ``target_transform``), checked
against the first example; otherwise by reading every example once.

Both splits are held in memory as tensors when they fit ``memory_budget_mb`` (the fast batched
path of the built-in sets); otherwise :class:`LazyExamples` reads examples on demand in the
DataLoader's worker processes. ``x[idx]`` is the same tensor either way, so both paths serve the
same examples in the same order for the same seed.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from kd_lightning import KDConfigError
from kd_lightning.data.sources import Splits

#: default of ``memory_budget_mb``: both splits are held in memory up to this many MiB
DEFAULT_MEMORY_BUDGET_MB = 2048.0

#: the per-channel statistics of ``normalize: standard`` are those of at most this many training
#: examples, evenly spaced over the split (all of them in smaller sets)
STATS_EXAMPLES = 10_000

SPEC_KEYS = ("class_path", "init_args", "train", "test", "num_classes", "mean", "std",
             "memory_budget_mb")

_FLOAT_PIL_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


# --------------------------------------------------------------------------------------------
# importing and instantiating class_path specs


def import_class(class_path: str, what: str = "dataset") -> Callable:
    """The class (or factory) named by a dotted ``class_path``; the working directory is
    importable, so a class in a ``.py`` file beside the config is found."""
    if not isinstance(class_path, str) or "." not in class_path:
        raise KDConfigError(f"{what} class_path must be a dotted name such as "
                            f"torchvision.datasets.ImageFolder or my_data.MyDataset, got "
                            f"{class_path!r}.")
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.insert(0, cwd)
    module_name, _, attr = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's class_path
        raise KDConfigError(
            f"cannot import {what} class_path '{class_path}': module '{module_name}' failed to "
            f"import ({type(err).__name__}: {err}). A class in a .py file is found when "
            f"kd-lightning runs in that file's folder or when the folder is on PYTHONPATH.") from None
    if not hasattr(module, attr):
        raise KDConfigError(f"cannot import {what} class_path '{class_path}': module "
                            f"'{module_name}' has no attribute '{attr}'.")
    return getattr(module, attr)


def instantiate(value):
    """``value`` with every nested ``{class_path, init_args}`` mapping replaced by the object
    it describes (``init_args`` instantiated first); other values are returned as they are."""
    if isinstance(value, dict):
        if "class_path" in value:
            extra = set(value) - {"class_path", "init_args"}
            if extra:
                raise KDConfigError(f"{value['class_path']}: a class_path entry takes only "
                                    f"class_path and init_args, got also {sorted(extra)}.")
            cls = import_class(value["class_path"], "transform/argument")
            kwargs = {k: _dtype_or_value(k, v) for k, v in instantiate(dict(value.get("init_args") or {})).items()}
            try:
                return cls(**kwargs)
            except Exception as err:  # noqa: BLE001
                raise KDConfigError(f"{value['class_path']}(**{kwargs}) failed: "
                                    f"{type(err).__name__}: {err}") from None
        return {k: instantiate(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(instantiate(v) for v in value)
    return value


def _dtype_or_value(name: str, value):
    """A torch dtype written as text in YAML (``torch.float32``, or ``float32`` for an argument
    named ``dtype``, as ``ToDtype`` takes) as the dtype; any other value as it is."""
    if isinstance(value, str):
        short = value[len("torch."):] if value.startswith("torch.") else (value if name == "dtype" else None)
        if short is not None and isinstance(getattr(torch, short, None), torch.dtype):
            return getattr(torch, short)
    return value


# --------------------------------------------------------------------------------------------
# examples and labels


def example_tensor(x, where: str) -> Tensor:
    """One example as the data module holds it: a PIL image as ``uint8`` ``[C, H, W]`` (``L``
    and ``RGB`` as they are, ``1`` as ``L``, other 8-bit modes as ``RGB``, 16/32-bit modes as
    ``float32`` ``[1, H, W]``), a ``uint8`` tensor as it is, any other tensor or array as
    ``float32`` with its own shape."""
    from PIL import Image

    if isinstance(x, Image.Image):
        if x.mode in _FLOAT_PIL_MODES:
            return torch.from_numpy(np.asarray(x, dtype=np.float32).copy()).unsqueeze(0)
        if x.mode not in ("L", "RGB"):
            x = x.convert("L" if x.mode == "1" else "RGB")
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(x).contiguous()
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
        x = torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Tensor):
        x = x.detach().as_subclass(Tensor).cpu()  # tv_tensors.Image is a Tensor subclass
        if x.dtype == torch.uint8:
            return x.contiguous().clone()
        if x.is_complex():
            raise KDConfigError(f"{where} is a complex tensor; give real-valued inputs.")
        return x.to(torch.float32).contiguous().clone()
    raise KDConfigError(
        f"{where} is a {type(x).__module__}.{type(x).__qualname__}, not an image or a tensor. "
        f"A dataset must return (x, y) with x a PIL image, a torch tensor or a numpy array; add a "
        f"transform to its init_args that produces one (e.g. torchvision.transforms.v2.ToImage).")


def label_value(y, where: str) -> int:
    """An integer class label (a Python/numpy integer or a one-element integer tensor)."""
    if isinstance(y, Tensor) and y.numel() == 1 and not y.is_floating_point() and not y.is_complex():
        return int(y.item())
    if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
        return int(y)
    raise KDConfigError(f"{where}: the label is {y!r} ({type(y).__name__}), not an integer class "
                        f"index. Return (x, y) with y an int in 0 .. num_classes - 1.")


def split_example(item, where: str):
    """``(x, y)`` of one dataset item, or a :class:`KDConfigError` if it carries no label."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        kind = type(item).__name__
        raise KDConfigError(
            f"{where} is a single {kind}, not (x, y): the dataset returns no labels. Training "
            f"needs a class label with each example; return (x, y) from __getitem__ (for an "
            f"unlabelled pool beside labelled data use data.unlabelled with train_subset).")
    return item[0], item[1]


def attribute_labels(ds) -> np.ndarray | None:
    """The labels a dataset exposes without decoding its examples (``targets``, ``samples`` /
    ``imgs`` of ``ImageFolder``, ``labels``), or ``None``. A ``target_transform`` changes what
    ``__getitem__`` returns, so such a dataset is read example by example instead."""
    if getattr(ds, "target_transform", None) is not None:
        return None
    n = len(ds)
    for attr in ("targets", "samples", "imgs", "labels"):
        value = getattr(ds, attr, None)
        if value is None:
            continue
        if attr in ("samples", "imgs"):
            try:
                value = [s[1] for s in value]
            except (TypeError, IndexError, KeyError):
                continue
        if isinstance(value, Tensor):
            value = value.detach().cpu().numpy()
        try:
            arr = np.asarray(value)
        except Exception:  # noqa: BLE001 - an attribute of another meaning
            continue
        if arr.ndim == 1 and len(arr) == n and arr.dtype.kind in "iu":
            return arr.astype(np.int64)
    return None


# --------------------------------------------------------------------------------------------
# examples read on demand


class LazyExamples:
    """The inputs of a map-style dataset, indexed like the ``[N, ...]`` tensor they would form:
    ``x[idx]`` (``idx`` a 1-D index tensor) reads examples ``idx`` one by one, converts them with
    :func:`example_tensor` and stacks them. In place of an in-memory tensor in
    :class:`~kd_lightning.data.IndexedTensorDataset`, it serves the same batches read per sample
    inside the DataLoader's worker processes."""

    def __init__(self, dataset, example_shape: Sequence[int], dtype: torch.dtype, split: str,
                 name: str) -> None:
        self.dataset, self.example_shape, self.dtype = dataset, tuple(example_shape), dtype
        self.split, self.name = split, name

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.dataset), *self.example_shape))

    @property
    def ndim(self) -> int:
        return 1 + len(self.example_shape)

    def __len__(self) -> int:
        return len(self.dataset)

    def example(self, i: int) -> Tensor:
        where = f"example {i} of the {self.split} split of {self.name}"
        x = example_tensor(split_example(self.dataset[i], where)[0], where)
        if tuple(x.shape) != self.example_shape or x.dtype != self.dtype:
            raise KDConfigError(_mismatch(where, x, self.example_shape, self.dtype))
        return x

    def __getitem__(self, idx) -> Tensor:
        if isinstance(idx, (int, np.integer)):
            return self.example(int(idx))
        positions = torch.as_tensor(idx).reshape(-1).tolist()
        out = torch.empty((len(positions), *self.example_shape), dtype=self.dtype)
        for row, i in enumerate(positions):
            out[row] = self.example(int(i))
        return out


def _mismatch(where: str, x: Tensor, shape: tuple, dtype: torch.dtype) -> str:
    return (f"{where} is a {x.dtype} tensor of shape {list(x.shape)}, but the first training "
            f"example is a {dtype} tensor of shape {list(shape)}: batches need examples of one "
            f"shape and type. Add a transform that gives every example the same size (e.g. "
            f"torchvision.transforms.v2.Resize([32, 32]) followed by CenterCrop).")


# --------------------------------------------------------------------------------------------
# the source


class CustomSource:
    """A ``{class_path, init_args, train, test, ...}`` dataset spec, checked and opened.

    Everything that can be wrong with the spec (an unimportable class, a dataset without labels,
    examples that are not images or tensors, labels outside ``0 .. num_classes - 1``) raises a
    :class:`KDConfigError` here, when the data module is built, before a Trainer or a run
    folder exists. Attributes: ``name`` (the class name), ``num_classes``, ``input_shape``,
    ``class_names``, ``in_memory`` (whether both splits fit ``memory_budget_mb``).
    """

    def __init__(self, spec: dict, normalize: str = "standard") -> None:
        if not isinstance(spec, dict) or "class_path" not in spec:
            raise KDConfigError(
                f"data.dataset must be a name or a mapping with a class_path (and init_args, train, "
                f"test), e.g. {{class_path: torchvision.datasets.ImageFolder, train: {{root: "
                f"my_data/train}}, test: {{root: my_data/test}}}}; got {spec!r}.")
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise KDConfigError(f"data.dataset: unknown key(s) {unknown}; valid keys: "
                                f"{', '.join(SPEC_KEYS)}.")
        self.spec = spec
        self.class_path = spec["class_path"]
        self.name = str(self.class_path).rpartition(".")[2]
        self.normalize = normalize
        budget = spec.get("memory_budget_mb", DEFAULT_MEMORY_BUDGET_MB)
        if budget is None or isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
            raise KDConfigError(f"data.dataset.memory_budget_mb={budget!r}: give a size in MiB "
                                f">= 0 (0 reads every example on demand).")
        self.memory_budget_mb = float(budget)

        cls = import_class(self.class_path)
        self.train_ds = self._build(cls, "train")
        self.test_ds = self._build(cls, "test")

        x0, y0 = self._first(self.train_ds, "train")
        self.input_shape: tuple[int, ...] = tuple(x0.shape)
        self.dtype = x0.dtype
        xt, yt = self._first(self.test_ds, "test")
        if tuple(xt.shape) != self.input_shape or xt.dtype != self.dtype:
            raise KDConfigError(_mismatch(f"example 0 of the test split of {self.name}", xt,
                                          self.input_shape, self.dtype))
        if self.dtype != torch.uint8 and normalize != "standard":
            raise KDConfigError(
                f"normalize={normalize} scales 8-bit pixels (PIL images or uint8 tensors); the "
                f"examples of {self.name} are {self.dtype} tensors, used as they are. Use "
                f"normalize=standard, or return uint8 images.")

        n = len(self.train_ds) + len(self.test_ds)
        self.bytes_needed = n * x0.numel() * x0.element_size()
        self.in_memory = self.bytes_needed <= self.memory_budget_mb * 2 ** 20
        # in memory, a dataset without label attributes is decoded once for images and labels
        self.x_train, self.y_train = self._read(self.train_ds, "train", y0)
        self.x_test, self.y_test = self._read(self.test_ds, "test", yt)

        self.num_classes, self.class_names = self._classes()
        self._splits: Splits | None = None

    # ---- building --------------------------------------------------------------------------
    def _split_kwargs(self, cls, split: str) -> dict:
        given = self.spec.get(split)
        if given is not None and not isinstance(given, dict):
            raise KDConfigError(f"data.dataset.{split} must be a mapping of keyword arguments of "
                                f"the {split} split (e.g. {{root: my_data/{split}}}), got {given!r}.")
        if given is None and self.spec.get("train" if split == "test" else "test") is None:
            try:
                params = inspect.signature(cls).parameters
            except (TypeError, ValueError):
                params = {}
            if "train" in params:
                given = {"train": split == "train"}
            elif "split" in params:
                given = {"split": split}
        if given is None:
            raise KDConfigError(
                f"data.dataset: say how {self.class_path} builds its {split} split: give "
                f"data.dataset.train and data.dataset.test, each a mapping of keyword arguments "
                f"(e.g. train: {{root: my_data/train}}, test: {{root: my_data/test}} for "
                f"ImageFolder). Only classes taking `train` or `split` get them automatically.")
        return given

    def _build(self, cls, split: str):
        init_args = self.spec.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise KDConfigError(f"data.dataset.init_args must be a mapping, got {init_args!r}.")
        kwargs = {**instantiate(dict(init_args)), **instantiate(dict(self._split_kwargs(cls, split)))}
        try:
            ds = cls(**kwargs)
        except KDConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - reported with the arguments that caused it
            raise KDConfigError(
                f"building the {split} split as {self.class_path}(**{kwargs}) failed: "
                f"{type(err).__name__}: {err}") from None
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise KDConfigError(
                f"{self.class_path} is not a map-style dataset (it needs __len__ and __getitem__ "
                f"returning (x, y)); iterable datasets are not supported.")
        if len(ds) == 0:
            raise KDConfigError(f"the {split} split of {self.name} ({kwargs}) is empty.")
        return ds

    def _first(self, ds, split: str) -> tuple[Tensor, int]:
        where = f"example 0 of the {split} split of {self.name}"
        x, y = split_example(ds[0], where)
        return example_tensor(x, where), label_value(y, where)

    def _read(self, ds, split: str, first_label: int) -> tuple[Tensor | LazyExamples, Tensor]:
        """The split's inputs (a tensor in memory, or :class:`LazyExamples`) and labels."""
        labels = attribute_labels(ds)
        if labels is not None and int(labels[0]) != first_label:
            labels = None  # the attribute is not what __getitem__ returns: read the examples
        if not self.in_memory and labels is not None:
            return LazyExamples(ds, self.input_shape, self.dtype, split, self.name), torch.from_numpy(labels)
        n = len(ds)
        x = torch.empty((n, *self.input_shape), dtype=self.dtype) if self.in_memory else None
        y = np.empty(n, dtype=np.int64)
        for i in range(n):
            where = f"example {i} of the {split} split of {self.name}"
            xi, yi = split_example(ds[i], where)
            y[i] = label_value(yi, where)
            xi = example_tensor(xi, where)
            if tuple(xi.shape) != self.input_shape or xi.dtype != self.dtype:
                raise KDConfigError(_mismatch(where, xi, self.input_shape, self.dtype))
            if x is not None:
                x[i] = xi
        if labels is not None and not np.array_equal(labels, y):
            labels = None
        if x is None:
            x = LazyExamples(ds, self.input_shape, self.dtype, split, self.name)
        return x, torch.from_numpy(y)

    def _classes(self) -> tuple[int, tuple[str, ...] | None]:
        classes = getattr(self.train_ds, "classes", None)
        names = None
        if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
            names = tuple(classes)
        low = int(min(self.y_train.min(), self.y_test.min()))
        high = int(max(self.y_train.max(), self.y_test.max()))
        given = self.spec.get("num_classes")
        if given is not None:
            if isinstance(given, bool) or not isinstance(given, int) or given < 2:
                raise KDConfigError(f"data.dataset.num_classes={given!r}: give an integer >= 2.")
            k, origin = given, "data.dataset.num_classes"
        elif names is not None:
            k, origin = len(names), f"the {len(names)} entries of {self.name}.classes"
        elif isinstance(getattr(self.train_ds, "num_classes", None), int):
            k, origin = int(self.train_ds.num_classes), f"{self.name}.num_classes"
        else:
            k, origin = high + 1, "the largest label + 1"
        if low < 0 or high >= k:
            raise KDConfigError(
                f"the labels of {self.name} run from {low} to {high}, outside 0 .. {k - 1} "
                f"(num_classes {k}, from {origin}). Labels must be class indices 0 .. K - 1; set "
                f"data.dataset.num_classes if the class list is incomplete.")
        if k < 2:
            raise KDConfigError(f"{self.name} has a single class (label {high}); classification "
                                f"needs at least two.")
        if names is not None and len(names) != k:
            names = None
        return k, names

    # ---- serving ---------------------------------------------------------------------------
    def statistics(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """Per-channel mean and standard deviation of the training pixels scaled to [0, 1]
        (channels: the first axis of an example), for ``normalize: standard``; the spec's
        ``mean``/``std`` when given. Of at most :data:`STATS_EXAMPLES` evenly spaced training
        examples, summed in float64 in chunks of 1000, identically on both loading paths."""
        if self.dtype != torch.uint8 or self.normalize != "standard":
            return None, None
        channels = self.input_shape[0] if len(self.input_shape) >= 2 else 1
        given = [self.spec.get("mean"), self.spec.get("std")]
        if given[0] is not None or given[1] is not None:
            if given[0] is None or given[1] is None:
                raise KDConfigError("data.dataset: give both mean and std (or neither, to compute "
                                    "them from the training split).")
            out = []
            for key, v in zip(("mean", "std"), given):
                v = [v] if isinstance(v, (int, float)) else list(v)
                if len(v) not in (1, channels) or (key == "std" and min(v) <= 0):
                    raise KDConfigError(f"data.dataset.{key}={given[key == 'std']!r}: give 1 or "
                                        f"{channels} values (per channel, of pixels in [0, 1])"
                                        f"{'; std must be positive' if key == 'std' else ''}.")
                out.append(tuple(float(a) for a in v))
            return out[0], out[1]
        n = len(self.y_train)
        positions = np.arange(n) if n <= STATS_EXAMPLES else np.unique(
            np.linspace(0, n - 1, STATS_EXAMPLES).round().astype(np.int64))
        total = torch.zeros(channels, dtype=torch.float64)
        squares = torch.zeros(channels, dtype=torch.float64)
        for start in range(0, len(positions), 1000):
            chunk = self.x_train[torch.from_numpy(positions[start:start + 1000])].double().div_(255.0)
            chunk = chunk.reshape(len(chunk), channels, -1).transpose(0, 1).reshape(channels, -1)
            total += chunk.sum(1)
            squares += chunk.square().sum(1)
        count = len(positions) * int(np.prod(self.input_shape)) // channels
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
        return tuple(mean.tolist()), tuple(std.tolist())

    def splits(self) -> Splits:
        if self._splits is None:
            mean, std = self.statistics()
            self._splits = Splits(self.name, self.x_train, self.y_train, self.x_test, self.y_test,
                                  self.num_classes, mean, std, class_names=self.class_names)
        return self._splits

    def loader_options(self, num_workers: int, trainer=None) -> dict:
        """DataLoader options: those of the built-in sets in memory; read on demand, worker
        processes (``data.num_workers``, or ``min(4, CPUs)`` when it is 0), kept alive across
        epochs, and pinned memory when training on a CUDA device."""
        if self.in_memory:
            return {"num_workers": num_workers, "persistent_workers": num_workers > 0}
        workers = num_workers or min(4, os.cpu_count() or 1)
        device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        return {"num_workers": workers, "persistent_workers": workers > 0,
                "pin_memory": getattr(device, "type", "cpu") == "cuda"}

    def describe(self) -> str:
        how = "in memory" if self.in_memory else "read per sample"
        return (f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test examples of "
                f"shape {list(self.input_shape)} ({self.dtype}), {self.num_classes} classes, "
                f"{how} ({self.bytes_needed / 2 ** 20:.1f} MiB, budget {self.memory_budget_mb:g} MiB)")
