r"""Training-set augmentation: named presets, torchvision transforms (v2) by ``class_path``, and
batch-level mixing (MixUp, CutMix).

``DistillDataModule(augment=...)`` takes

- a preset name: ``none``, ``crop_flip`` and ``jitter`` are built in the data set's batched path
  (:func:`~kd_lightning.data.dataset.random_crop_flip`, ``random_translate``: per-example offsets
  and flips for a whole batch at once); ``autoaugment_cifar``, ``randaugment`` and ``cutout`` are
  pipelines of :data:`PRESETS`;
- a list of transforms, each a ``class_path`` / ``init_args`` mapping (as in a YAML config) or a
  callable, e.g. ``torchvision.transforms.v2.RandomErasing``; a preset name inside the list
  stands for its transforms.

A pipeline (anything but the three built-in names) runs on the training device, in
``DistillDataModule.on_after_batch_transfer`` (Lightning's hook for augmenting moved batches;
it sees every minibatch of a ``batches_per_step`` group and each DDP rank's own shard): the
training loader serves the raw examples -- the 8-bit pixels (``uint8``, 0..255) of the image sets,
the float inputs of the others -- the pipeline transforms them, and the data set's scaling
(``normalize``) follows, so uint8-only transforms (AutoAugment, RandAugment) get pixels and
padding or erasing fills with black. torchvision's transforms draw their random parameters once
per call, so each one is applied per example (its own crop, flip, policy for every image);
transforms with ``batched = True`` (:class:`RandomCropFlip`, :class:`RandomTranslate`,
:class:`Cutout`) draw per example themselves and take the whole batch at once.

MixUp (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) mix each training batch with a
random permutation of itself after scaling (:class:`Mixing`); the labels become
:class:`~kd_lightning.losses.labels.MixedTargets` and every label term ``L(y)`` becomes
``lam L(y_a) + (1 - lam) L(y_b)``. The teacher sees the same mixed input as the student.

Any pipeline or mixing makes the training inputs random, so the per-example teacher-output cache is
off (``DistillDataModule.deterministic_train``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from kd_lightning import KDConfigError
from kd_lightning.data.dataset import AUGMENTATIONS, random_crop_flip
from kd_lightning.losses.labels import MixedTargets


class RandomCropFlip(nn.Module):
    """Zero-pad by ``padding``, crop back at a random offset, flip horizontally with probability
    1/2 (``flip``): torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()``, with
    every example's own draw, for a ``[B, C, H, W]`` batch at once."""

    batched = True

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        super().__init__()
        self.padding, self.flip = padding, flip

    def forward(self, x: Tensor) -> Tensor:
        return random_crop_flip(x, self.padding, self.flip)


class RandomTranslate(RandomCropFlip):
    """Shift every image by its own ``(dy, dx)``, each uniform in ``{-max_shift..max_shift}``,
    zero fill (Hinton et al. 2015's MNIST jitter), for a batch at once."""

    def __init__(self, max_shift: int = 2) -> None:
        super().__init__(padding=max_shift, flip=False)


class Cutout(nn.Module):
    """Cutout (DeVries & Taylor 2017): zero a ``size`` x ``size`` square centred at a uniformly
    drawn pixel of each image (clipped at the border, so it may cover less), for a batch at once.
    The square is black: it is applied to the pixels before scaling."""

    batched = True

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        if size < 1:
            raise KDConfigError(f"Cutout: size must be >= 1 pixel, got {size}.")
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        cy = torch.randint(0, h, (b, 1)).to(x.device)
        cx = torch.randint(0, w, (b, 1)).to(x.device)
        half = self.size // 2
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        inside_r = (rows >= cy - half) & (rows < cy + self.size - half)  # [B, H]
        inside_c = (cols >= cx - half) & (cols < cx + self.size - half)  # [B, W]
        box = inside_r[:, :, None] & inside_c[:, None, :]
        return x.masked_fill(box[:, None], 0)


def _autoaugment_cifar() -> list:
    from torchvision.transforms import v2

    return [RandomCropFlip(4), v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)]


def _randaugment() -> list:
    from torchvision.transforms import v2

    return [v2.RandAugment(num_ops=2, magnitude=9)]


#: named pipelines: (builder, flips images, needs 8-bit pixels, description)
PRESETS: dict[str, tuple[Callable[[], list], bool, bool, str]] = {
    "autoaugment_cifar": (_autoaugment_cifar, True, True,
                          "pad-4 crop + flip + AutoAugment's CIFAR-10 policy (Cubuk et al. 2019)"),
    "randaugment": (_randaugment, False, True,
                    "RandAugment, 2 operations of magnitude 9 (Cubuk et al. 2020)"),
    "cutout": (lambda: [RandomCropFlip(4), Cutout(16)], True, False,
               "pad-4 crop + flip + a 16x16 Cutout square (DeVries & Taylor 2017, CIFAR-10)"),
}
#: the built-in names as pipeline steps, for use inside a list
_IN_LIST = {"none": lambda: [], "crop_flip": lambda: [RandomCropFlip(4)],
            "jitter": lambda: [RandomTranslate(2)]}
#: data sets whose mirrored images are other symbols
_NO_FLIP = ("mnist", "digits")
#: data sets served as floats (not 8-bit pixels)
_FLOAT_SOURCES = ("mnist1d", "digits")


def preset_names() -> list[str]:
    return [*AUGMENTATIONS, *PRESETS]


class BatchAugmentation:
    """A list of transforms applied to a raw training batch ``[B, ...]`` on its device: each
    transform with ``batched = True`` to the whole batch, runs of the others per example.

    Args:
        transforms: callables mapping an image tensor to one of the same shape and dtype.
        name: how the configuration named it (for messages).
    """

    def __init__(self, transforms: Sequence[Callable], name: str = "augment") -> None:
        self.transforms, self.name = list(transforms), name
        self._stages: list[tuple[bool, list[Callable]]] = []
        for t in self.transforms:
            batched = bool(getattr(t, "batched", False))
            if self._stages and self._stages[-1][0] == batched:
                self._stages[-1][1].append(t)
            else:
                self._stages.append((batched, [t]))
        self.checked = False

    def __call__(self, x: Tensor) -> Tensor:
        for batched, transforms in self._stages:
            if batched:
                for t in transforms:
                    x = t(x)
            else:
                x = torch.stack([_chain(transforms, xi) for xi in x])
        return x

    def check(self, sample: Tensor) -> None:
        """Run every transform on ``sample`` (a few raw training examples) without touching the
        global random state: each must take the tensors it gets and return one of the same shape
        and dtype, else a :class:`KDConfigError` names it."""
        if self.checked or not len(sample):
            return
        with torch.random.fork_rng(devices=[]):
            x = sample.clone()
            for t in self.transforms:
                batched = bool(getattr(t, "batched", False))
                given = x if batched else x[0]
                try:
                    out = t(given)
                except Exception as err:  # noqa: BLE001 - reported with the transform's name
                    raise KDConfigError(
                        f"{self.name}: {_describe(t)} failed on a training "
                        f"{'batch' if batched else 'image'} of shape {tuple(given.shape)} and dtype "
                        f"{given.dtype} ({type(err).__name__}: {err}). Each transform gets one "
                        f"image tensor [C, H, W] ({_pixels(given)}) and must return a tensor of "
                        f"the same shape and dtype; transforms for PIL images (e.g. "
                        f"transforms.ToTensor) do not work here, use torchvision.transforms.v2."
                    ) from None
                if (not isinstance(out, Tensor) or out.shape != given.shape
                        or out.dtype != given.dtype):
                    got = (f"shape {tuple(out.shape)} and dtype {out.dtype}" if isinstance(out, Tensor)
                           else f"a {type(out).__name__}")
                    raise KDConfigError(
                        f"{self.name}: {_describe(t)} turned a tensor of shape {tuple(given.shape)} "
                        f"and dtype {given.dtype} into {got}. Augmentations must keep the shape "
                        f"and dtype ({_pixels(given)}); the data module scales the pixels itself "
                        f"(data.normalize), so leave out ToDtype/Normalize/ToTensor/Resize.")
                x = out if batched else torch.stack([_chain([t], xi) for xi in x])
        self.checked = True

    def __repr__(self) -> str:
        return f"BatchAugmentation({self.name}: {', '.join(_describe(t) for t in self.transforms)})"


def _chain(transforms: list[Callable], x: Tensor) -> Tensor:
    for t in transforms:
        x = t(x)
    return x


def _describe(t) -> str:
    return type(t).__qualname__ if not isinstance(t, type) else t.__qualname__


def _pixels(x: Tensor) -> str:
    return "uint8 pixels 0..255" if x.dtype == torch.uint8 else f"{x.dtype} values"


def _instantiate(spec, where: str):
    """A ``class_path`` / ``init_args`` mapping (nested ones in ``init_args`` too) -> object."""
    if isinstance(spec, list):
        return [_instantiate(s, where) for s in spec]
    if not isinstance(spec, dict) or "class_path" not in spec:
        return spec
    extra = set(spec) - {"class_path", "init_args"}
    if extra:
        raise KDConfigError(f"{where}: unexpected keys {sorted(extra)}; a transform is given as "
                            f"class_path (e.g. torchvision.transforms.v2.RandomErasing) and "
                            f"init_args.")
    path = str(spec["class_path"])
    module_name, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise KDConfigError(f"{where}: cannot import class_path '{path}' ({err}); give the full "
                            f"dotted path, e.g. torchvision.transforms.v2.RandomCrop.") from None
    args = {k: _instantiate(v, where) for k, v in (spec.get("init_args") or {}).items()}
    try:
        return cls(**args)
    except Exception as err:  # noqa: BLE001 - the transform's own argument check
        raise KDConfigError(f"{where}: {path}(**{args}) failed: {type(err).__name__}: {err}") from None


def resolve_augment(augment, dataset: str, input_shape: tuple[int, ...]) -> str | BatchAugmentation:
    """``augment`` as the data module keeps it: a built-in name of
    :data:`~kd_lightning.data.dataset.AUGMENTATIONS` (applied by the data set) or a
    :class:`BatchAugmentation` (applied on the device). Raises :class:`KDConfigError` for an
    unknown name, something that is not a transform, or a recipe that does not fit the data."""
    if augment is None:
        augment = "none"
    augment = {True: "crop_flip", False: "none"}.get(augment, augment) if isinstance(augment, bool) else augment
    image = len(input_shape) == 3
    if isinstance(augment, str):
        if augment not in AUGMENTATIONS and augment not in PRESETS:
            raise KDConfigError(
                f"unknown augment={augment!r}. Valid values: {', '.join(preset_names())} (true "
                f"means crop_flip, false none), or a list of transforms (class_path + init_args, "
                f"e.g. torchvision.transforms.v2.RandomErasing).")
        if augment != "none" and not image:
            raise KDConfigError(f"augment={augment} is for image data sets; {dataset} is 1-D. Use "
                                f"augment=none.")
        flips = augment == "crop_flip" or (augment in PRESETS and PRESETS[augment][1])
        if flips and dataset in _NO_FLIP:
            # a mirrored digit is another symbol (or none), and pad-4 crops are the CIFAR recipe
            what = "augment=crop_flip (augment: true)" if augment == "crop_flip" else f"augment={augment}"
            raise KDConfigError(
                f"{what} flips images horizontally, and a mirrored digit of {dataset} is another "
                f"symbol. Use augment=jitter (random translation by up to 2 pixels, no flip: the "
                f"MNIST recipe) or augment=none.")
        if augment in AUGMENTATIONS:
            return augment
        if PRESETS[augment][2] and dataset in _FLOAT_SOURCES:
            raise KDConfigError(f"augment={augment} works on 8-bit pixels; {dataset} comes "
                                f"preprocessed as floats. Use augment=jitter or a list of "
                                f"transforms that take float images.")
        return BatchAugmentation(PRESETS[augment][0](), name=f"augment={augment}")
    if not isinstance(augment, (list, tuple)):
        raise KDConfigError(f"augment={augment!r}: give a preset name ({', '.join(preset_names())}) "
                            f"or a list of transforms (class_path + init_args).")
    if not augment:
        return "none"
    if not image:
        raise KDConfigError(f"augment (a list of transforms) is for image data sets; {dataset} is "
                            f"1-D. Use augment=none.")
    transforms = []
    for i, item in enumerate(augment):
        where = f"augment[{i}]"
        if isinstance(item, str):
            if item in _IN_LIST:
                transforms += _IN_LIST[item]()
            elif item in PRESETS:
                transforms += PRESETS[item][0]()
            else:
                raise KDConfigError(f"{where}={item!r} is not a preset ({', '.join(preset_names())}); "
                                    f"give a transform as class_path + init_args.")
            continue
        t = _instantiate(item, where)
        if isinstance(t, type) or not callable(t):
            raise KDConfigError(f"{where}: {t!r} is not a transform (a callable taking an image "
                                f"tensor); give e.g. class_path: torchvision.transforms.v2.RandomCrop "
                                f"with its init_args.")
        transforms.append(t)
    return BatchAugmentation(transforms, name="augment")


class Mixing:
    r"""MixUp / CutMix of a training batch with a random permutation ``perm`` of itself.

    MixUp (Zhang et al. 2018): :math:`\tilde x = \lambda x + (1 - \lambda) x_{perm}`,
    :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)`. CutMix (Yun et al. 2019): the box of
    relative area :math:`1 - \lambda` centred at a uniform pixel (clipped at the border) is copied
    from :math:`x_{perm}`, and :math:`\lambda` is set to one minus the box's actual area.
    The targets become ``MixedTargets(y, y[perm], lam)``. One ``lam`` per batch, as in both papers.

    Args:
        mixup: MixUp's ``alpha`` (0: off).
        cutmix: CutMix's ``alpha`` (0: off). With both on, each mixed batch picks one at random.
        prob: the probability that a batch is mixed at all (the others keep their labels).
    """

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0) -> None:
        self.mixup, self.cutmix, self.prob = float(mixup), float(cutmix), float(prob)

    @classmethod
    def from_config(cls, mixup: float, cutmix: float, prob: float, dataset: str,
                    input_shape: tuple[int, ...]) -> Mixing | None:
        """The mixing of a data module's configuration (``None`` when off), checked."""
        for name, value in (("mixup", mixup), ("cutmix", cutmix)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise KDConfigError(f"{name}={value!r}: give the Beta distribution's alpha > 0 "
                                    f"(0.2-1 for MixUp, 1 for CutMix), or 0 for off.")
        if not 0 <= prob <= 1:
            raise KDConfigError(f"mix_prob={prob!r} must be in [0, 1] (the probability that a "
                                f"training batch is mixed).")
        if cutmix > 0 and len(input_shape) != 3:
            raise KDConfigError(f"cutmix pastes a box of one image into another; {dataset} is 1-D "
                                f"(input {tuple(input_shape)}). Use mixup (which blends any "
                                f"inputs) or cutmix: 0.")
        if not (mixup > 0 or cutmix > 0) or prob == 0:
            return None
        return cls(mixup, cutmix, prob)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | MixedTargets]:
        if self.prob < 1 and float(torch.rand(())) >= self.prob:
            return x, y
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or float(torch.rand(())) < 0.5)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha)).sample())
        perm = torch.randperm(x.shape[0]).to(x.device)
        if use_cutmix:
            x, lam = cutmix(x, perm, lam)
        else:
            x = mixup(x, perm, lam)
        return x, MixedTargets(y, y[perm], lam)

    def __repr__(self) -> str:
        return f"Mixing(mixup={self.mixup}, cutmix={self.cutmix}, prob={self.prob})"


def mixup(x: Tensor, perm: Tensor, lam: float) -> Tensor:
    r"""MixUp's input: :math:`\lambda x + (1 - \lambda) x_{perm}` (Zhang et al., ICLR 2018)."""
    return x * lam + x[perm] * (1.0 - lam)


def cutmix(x: Tensor, perm: Tensor, lam: float) -> tuple[Tensor, float]:
    r"""CutMix's input and weight (Yun et al., ICCV 2019): a box of size
    :math:`H\sqrt{1-\lambda} \times W\sqrt{1-\lambda}` centred at a uniform pixel, clipped at the
    border, is copied from :math:`x_{perm}`; returns the image and
    :math:`\lambda = 1 - \text{box area} / (H W)`."""
    h, w = x.shape[-2:]
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def augment_training_batch(batch, augmentation: BatchAugmentation | None, finish: Callable | None,
                           mixing: Mixing | None):
    """A moved training batch ``(x, y, index)`` (or a ``batches_per_step`` group of them) with
    ``augmentation`` applied to the raw inputs, then ``finish`` (the data set's scaling), then
    ``mixing``."""
    if isinstance(batch, (list, tuple)) and batch and not isinstance(batch[0], Tensor):
        return [augment_training_batch(b, augmentation, finish, mixing) for b in batch]
    x, y, index = batch
    if augmentation is not None:
        x = augmentation(x)
        x = finish(x) if finish is not None else x
    if mixing is not None:
        x, y = mixing(x, y)
    return type(batch)((x, y, index))


def check_mixing(module, datamodule) -> None:
    """Refuse a fit whose data module mixes batches (``mixup`` / ``cutmix``) with a method that
    cannot use mixed targets (its :meth:`~kd_lightning.methods.DistillationModule.mixing_refusal`)."""
    mixing = getattr(datamodule, "mixing", None)
    if mixing is None:
        return
    reason = module.mixing_refusal()
    if reason:
        raise KDConfigError(f"{type(module).__name__} cannot train on mixed batches (data.mixup="
                            f"{mixing.mixup:g}, data.cutmix={mixing.cutmix:g}): {reason}")


__all__ = ["BatchAugmentation", "Cutout", "Mixing", "PRESETS", "RandomCropFlip", "RandomTranslate",
           "augment_training_batch", "check_mixing", "cutmix", "mixup", "preset_names",
           "resolve_augment"]
