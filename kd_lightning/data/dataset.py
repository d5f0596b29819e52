"""In-memory datasets yielding ``(x, y, index)`` with a fast whole-batch path.

``IndexedTensorDataset`` implements both ``__getitem__`` (one example) and ``__getitems__``
(a list of indices -> one batch). PyTorch's ``DataLoader`` calls ``__getitems__`` when it is
defined, so with :func:`batch_collate` a batch is a few tensor-indexing operations instead of
``batch_size`` Python calls plus a collation. Shuffling, ``drop_last`` and DDP sharding stay
the ``DataLoader``'s own (``RandomSampler``/``DistributedSampler``), so the order of examples is
exactly that of a regular per-sample loader with the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, default_collate


def random_crop_flip(x: Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> Tensor:
    """Batched CIFAR augmentation: zero-pad by ``padding``, random crop back, random h-flip.

    Each example gets its own crop offset and flip, as torchvision's ``RandomCrop(32, 4)`` +
    ``RandomHorizontalFlip()`` would give, but for a whole ``[B, C, H, W]`` batch at once.
    """
    b, _, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # [B, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # [B, 1, W]
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2)  # [B, C, H, W]
    if flip:
        do_flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
        out = torch.where(do_flip[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


def random_translate(x: Tensor, max_shift: int = 2, generator: torch.Generator | None = None) -> Tensor:
    """Batched jitter: shift each image by its own ``(dy, dx)``, each uniform in
    ``{-max_shift, ..., max_shift}``, filling the uncovered border with zeros.

    The augmentation of Hinton et al. 2015's MNIST teacher ("jittered by up to two pixels in any
    direction"). A shift by ``d`` is a crop at offset ``d + max_shift`` of the image zero-padded by
    ``max_shift``, so this is :func:`random_crop_flip` without the flip.
    """
    return random_crop_flip(x, padding=max_shift, flip=False, generator=generator)


#: training-set augmentations, by name
AUGMENTATIONS = {
    "none": None,
    "crop_flip": random_crop_flip,  # CIFAR: pad 4, random crop, random horizontal flip
    "jitter": random_translate,  # MNIST-style: random translation by up to +-2 pixels
}

#: input scalings of ``uint8`` images, by name
NORMALIZATIONS = ("standard", "unit", "none")


class IndexedTensorDataset(Dataset):
    """Examples ``x[indices[i]], y[indices[i]]`` returned as ``(x, y, index)``.

    ``index`` is the position in the *source* training (or test) array, not in the subset, so
    per-example caches (e.g. teacher outputs) can be keyed by it across subsets and splits.

    Args:
        x, y: the whole split in memory. ``uint8`` inputs are scaled as ``normalize`` says; float
            inputs are used as they are.
        indices: which examples of the split this dataset exposes.
        mean, std: per-channel statistics (of the pixels scaled to [0, 1]) for ``"standard"``.
        augment: a name of :data:`AUGMENTATIONS` (``True`` means ``"crop_flip"``, ``False``
            ``"none"``); images only. On ``uint8`` images it is applied to the pixels in [0, 1]
            before normalisation, so padding is black, as with torchvision's transforms on images.
            A callable (a :class:`~kd_lightning.data.augment.BatchAugmentation`) is applied on the
            training device instead: the loader then serves the raw inputs (``uint8`` pixels as
            they are) and the data module applies it and :meth:`finish`.
        normalize: scaling of ``uint8`` pixels ``p``: ``"standard"`` ``(p / 255 - mean) / std``,
            ``"unit"`` ``p / 255`` (in [0, 1]), ``"none"`` ``p`` as a float (0..255).
    """

    def __init__(self, x: Tensor, y: Tensor, indices: Sequence[int] | Tensor | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augment: bool | str = False, normalize: str = "standard") -> None:
        self.x, self.y = x, y
        self.indices = (torch.arange(len(y)) if indices is None
                        else torch.as_tensor(indices, dtype=torch.int64))
        #: applied to the raw batches on the device (the loader serves them unscaled), or None
        self.device_augment = augment if callable(augment) else None
        if self.device_augment is not None:
            augment = "none"
        augment = {True: "crop_flip", False: "none"}.get(augment, augment)
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {sorted(AUGMENTATIONS)}, got {augment!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.augment, self.normalize = augment, normalize
        self._augment_fn = AUGMENTATIONS[augment]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        self._mean = torch.as_tensor(mean, dtype=torch.float32).view(shape) if mean is not None else None
        self._std = torch.as_tensor(std, dtype=torch.float32).view(shape) if std is not None else None
        if (self._augment_fn is not None or self.device_augment is not None) and x.ndim != 4:
            raise ValueError(f"augment={augment!r} needs image inputs [N, C, H, W]")
        if hasattr(self.device_augment, "check"):
            self.device_augment.check(x[self.indices[:4]])

    def __len__(self) -> int:
        return len(self.indices)

    def _prepare(self, xb: Tensor) -> Tensor:
        if xb.dtype != torch.uint8:
            return xb if self._augment_fn is None else self._augment_fn(xb)
        xb = xb.float()
        if self._augment_fn is not None:
            xb = self._augment_fn(xb)  # zero padding: black in every scaling
        if self.normalize != "none":
            xb = xb.div_(255.0)
        if self.normalize == "standard" and self._mean is not None:
            xb = xb.sub_(self._mean).div_(self._std)
        return xb

    def finish(self, xb: Tensor) -> Tensor:
        """Model inputs from a raw (device-augmented) batch: the scaling of ``normalize``."""
        if xb.dtype != torch.uint8:
            return xb
        xb = xb.float()
        if self.normalize != "none":
            xb = xb.div_(255.0)
        if self.normalize == "standard" and self._mean is not None:
            xb = xb.sub_(self._mean.to(xb.device)).div_(self._std.to(xb.device))
        return xb

    def get_batch(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Batch for ``positions`` (positions into this dataset, not source indices), as the
        model takes it (without a device augmentation)."""
        idx = self.indices[positions]
        return self._prepare(self.x[idx]), self.y[idx], idx

    def loader_batch(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Batch for ``positions`` as the loader serves it: :meth:`get_batch`, or the raw inputs
        when a device augmentation follows."""
        if self.device_augment is None:
            return self.get_batch(positions)
        idx = self.indices[positions]
        return self.x[idx], self.y[idx], idx

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        return self.loader_batch(torch.as_tensor(positions, dtype=torch.int64))

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor, Tensor]:
        x, y, idx = self.loader_batch(torch.tensor([int(position)]))
        return x[0], y[0], idx[0]


class PerSampleDataset(Dataset):
    """The same examples without ``__getitems__``: the regular per-sample loading path."""

    def __init__(self, base: IndexedTensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, position: int):
        return self.base[position]


class MinibatchGroups(Dataset):
    """Serves a group of consecutive minibatches per loader item (``batches_per_step``).

    A loader over this dataset with ``batch_size = k * minibatch_size`` yields lists of ``k``
    ``(x, y, index)`` minibatches, the last group shorter (and its last minibatch smaller, or
    dropped with ``drop_last``): exactly the batches of a loader with ``minibatch_size``.
    """

    def __init__(self, base: Dataset, minibatch_size: int, drop_last: bool = False) -> None:
        self.base, self.minibatch_size, self.drop_last = base, minibatch_size, drop_last

    def __len__(self) -> int:
        return len(self.base)

    def __getitems__(self, positions: list[int]) -> list:
        b = self.minibatch_size
        chunks = [positions[i:i + b] for i in range(0, len(positions), b)]
        if self.drop_last and chunks and len(chunks[-1]) < b:
            chunks.pop()
        if hasattr(self.base, "loader_batch"):
            return [self.base.loader_batch(torch.as_tensor(c, dtype=torch.int64)) for c in chunks]
        return [default_collate([self.base[i] for i in c]) for c in chunks]

    def __getitem__(self, position: int):
        return self.base[position]


def batch_collate(batch):
    """Collate for :meth:`IndexedTensorDataset.__getitems__`: the batch is already built."""
    return batch
