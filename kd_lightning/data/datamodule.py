"""``DistillDataModule``: one LightningDataModule for every method and data set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from kd_lightning import KDConfigError
from kd_lightning.data.augment import Mixing, augment_training_batch, resolve_augment
from kd_lightning.data.custom import CustomSource
from kd_lightning.data.dataset import (NORMALIZATIONS, IndexedTensorDataset,
                                       MinibatchGroups, PerSampleDataset, batch_collate)
from kd_lightning.data.sources import SOURCES, Splits, load_source, source_input_shape
from kd_lightning.data.subset import (stratified_subset, stratified_subset_per_class, train_val_split,
                                      unlabelled_subset)
from kd_lightning.losses.labels import UNLABELLED
from kd_lightning.training.grouping import move_batch

#: static facts about each data set, so the CLI can link them into models before loading data
DATASET_INFO: dict[str, tuple[int, tuple[int, ...]]] = {
    "mnist1d": (10, (1, 40)),
    "digits": (10, (1, 8, 8)),
    "mnist": (10, (1, 28, 28)),
    "fashion_mnist": (10, (1, 28, 28)),
    "cifar10": (10, (3, 32, 32)),
    "cifar100": (100, (3, 32, 32)),
    "multiview": (2, source_input_shape("multiview", None)),
}
assert set(DATASET_INFO) == set(SOURCES)


class DistillDataModule(pl.LightningDataModule):
    """Serves ``(x, y, index)`` batches of one data set, with few-data training subsets.

    Args:
        dataset: one of ``mnist1d``, ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10``,
            ``cifar100``. The first two are generated/bundled offline; the torchvision sets read
            their original files under ``root``. Or any map-style dataset returning ``(x, y)``,
            as a mapping ``{class_path, init_args, train, test, num_classes, mean, std,
            memory_budget_mb}`` (a torchvision dataset class, ``ImageFolder``, a class of one's
            own): see :mod:`kd_lightning.data.custom`. It is held in memory when it fits
            ``memory_budget_mb`` (default 2048), otherwise read per sample in ``num_workers``
            worker processes (``min(4, CPUs)`` when 0).
        root: folder holding (or receiving) the data files.
        download: let torchvision download missing files (needs a network).
        batch_size: training batch size (per device under DDP).
        eval_batch_size: validation/test batch size (default: ``max(batch_size, 500)``).
        train_subset: ``M``, the number of labelled training examples the model sees, drawn
            stratified per class (``M / num_classes`` each) from the training split by a pure
            function of ``(labels, M, subset_seed)``; ``None`` uses the whole training split. The
            chosen indices are written to ``train_subset.json`` in the run's log directory.
        train_subset_per_class: the few-data budget as a number per class instead: that many
            labelled examples of every class (``num_classes`` times as many in all), the draw
            :func:`~kd_lightning.data.stratified_subset_per_class` (the one ``train_subset`` of the
            product makes, so ``50`` per class on ten classes is ``train_subset: 500``). Exclusive
            with ``train_subset``; refused when a class has fewer examples.
            ``train_subset.json`` records which of the two was given.
        subset_seed: seed of the subset draw (and of the unlabelled draw).
        unlabelled: ``U`` unlabelled transfer examples trained on beside the ``M`` labelled ones:
            a number, ``"rest"`` (every training-split example outside the labelled subset) or
            ``None`` (none; 0 is the same). They come from the training split minus the labelled
            subset (never the validation split), drawn uniformly at random by a pure function of
            ``(labels, M, subset_seed, U)`` (:func:`~kd_lightning.data.unlabelled_subset`), so
            every DDP rank and every rerun has the same ones; the labelled subset is the one
            drawn without them. They are shuffled into the training batches with label
            ``y = UNLABELLED`` (-1), so batches stay ``(x, y, index)``: methods use them in their
            distillation terms and skip them in their label terms (README, "Unlabelled transfer
            data"). Needs ``train_subset`` or ``train_subset_per_class``. Their indices are written to ``train_subset.json``
            with the labelled ones.
        val_split: fraction (or count) of the source training set held out for validation.
        split_seed: seed of the validation split (kept fixed across few-data runs so every run is
            validated on the same examples).
        augment: augmentation of the training images: ``"none"`` (or ``false``), ``"crop_flip"``
            (or ``true``; zero-pad 4, random crop, random horizontal flip: the CIFAR recipe),
            ``"jitter"`` (random translation by up to +-2 pixels in each direction, zero fill: the
            MNIST recipe of Hinton et al. 2015's teacher), ``"autoaugment_cifar"``,
            ``"randaugment"``, ``"cutout"``, or a list of transforms (``class_path`` +
            ``init_args``, e.g. ``torchvision.transforms.v2.RandomErasing``) applied per example
            on the training device before scaling (:mod:`kd_lightning.data.augment`). Validation
            and test images are never augmented. Augmented inputs differ at every epoch, so methods
            do not cache teacher outputs per example when it is on (:attr:`deterministic_train`).
        mixup: MixUp's Beta ``alpha`` (0: off): each training batch is blended with a permutation
            of itself, and every label term becomes ``lam L(y_a) + (1 - lam) L(y_b)``; the teacher
            sees the mixed input (:class:`~kd_lightning.data.augment.Mixing`).
        cutmix: CutMix's Beta ``alpha`` (0: off; images only): a box of the permuted batch is
            pasted in. With ``mixup`` too, each mixed batch uses one of them at random.
        mix_prob: the probability that a training batch is mixed (default 1).
        normalize: scaling of the pixels ``p`` (0..255) of the image sets (``mnist``,
            ``fashion_mnist``, ``cifar10``, ``cifar100``): ``"standard"`` (default)
            ``(p / 255 - mean) / std`` with the per-channel training-set statistics (MNIST: 0.1307
            / 0.3081), ``"unit"`` ``p / 255`` in [0, 1], ``"none"`` ``p`` unscaled. ``mnist1d``
            and ``digits`` come preprocessed and only take ``"standard"``.
        batched: build each batch by indexing in-memory tensors (fast). ``False`` uses the regular
            per-sample ``__getitem__`` + collate path; both give the same examples in the same order.
        num_workers: DataLoader worker processes (0 is fastest for in-memory data).
        drop_last: drop the last incomplete training batch.
        batches_per_step: ``k`` consecutive training minibatches delivered together in one
            Lightning step, as a list of ``k`` ``(x, y, index)`` batches; the method still takes
            one optimizer step per minibatch, on the same examples in the same order as with
            ``k = 1`` (same math, same student). It amortises Lightning's fixed per-step cost
            (about 0.3 ms) over ``k`` steps, which matters for tiny models whose own step costs
            less than that (the MNIST-1D and digits configs use 10). ``global_step`` and
            ``max_steps`` still count optimizer steps; Lightning's batch counters
            (``limit_train_batches``, integer ``val_check_interval``, progress bar) count groups.
            Not combinable with ``accumulate_grad_batches``.
        source_options: keyword arguments of the data set's source; only ``multiview`` takes any
            (``patch_dim``, ``patches``, ``noise``, ``n_train``, ``n_test``, ``seed``; see
            :func:`~kd_lightning.data.sources.load_multiview`).
    """

    def __init__(self, dataset: str | dict = "mnist1d", root: str = "data", download: bool = False,
                 batch_size: int = 100, eval_batch_size: int | None = None,
                 train_subset: int | None = None, subset_seed: int = 0,
                 val_split: int | float = 0.1, split_seed: int = 0,
                 augment: bool | str | list | None = False,
                 normalize: str = "standard", batched: bool = True, num_workers: int = 0,
                 drop_last: bool = False, batches_per_step: int = 1,
                 source_options: dict | None = None,
                 unlabelled: int | str | None = None, mixup: float = 0.0, cutmix: float = 0.0,
                 mix_prob: float = 1.0, train_subset_per_class: int | None = None) -> None:
        super().__init__()
        # a dataset by class_path is opened (labels read, examples checked) here
        self._custom = CustomSource(dataset, normalize) if isinstance(dataset, dict) else None
        if self._custom is None and dataset not in DATASET_INFO:
            raise KDConfigError(
                f"unknown dataset '{dataset}'. Valid names: {', '.join(sorted(DATASET_INFO))}.")
        if batch_size < 1:
            raise KDConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if batches_per_step < 1:
            raise KDConfigError(f"batches_per_step must be >= 1, got {batches_per_step}; 1 gives "
                                f"one minibatch per Lightning step.")
        info = (self._custom.num_classes, self._custom.input_shape) if self._custom else DATASET_INFO[dataset]
        k = info[0]
        if train_subset is not None and train_subset_per_class is not None:
            raise KDConfigError(
                f"data.train_subset={train_subset} and data.train_subset_per_class="
                f"{train_subset_per_class} both set the few-data budget; give one of them "
                f"(train_subset: labelled examples in all; train_subset_per_class: per class).")
        if train_subset_per_class is not None and (
                isinstance(train_subset_per_class, bool) or not isinstance(train_subset_per_class, int)
                or train_subset_per_class < 1):
            raise KDConfigError(
                f"train_subset_per_class={train_subset_per_class!r} must be a positive integer (the "
                f"labelled examples drawn from each class), or null for the full training set.")
        if train_subset is not None and train_subset < k:
            raise KDConfigError(
                f"train_subset={train_subset} is smaller than the number of classes of "
                f"{self._custom.name if self._custom else dataset} "
                f"({k}): a stratified subset needs at least one example per class. Use "
                f"train_subset >= {k}, or null for the full training set.")
        unlabelled = _check_unlabelled(
            unlabelled, train_subset if train_subset is not None else train_subset_per_class)
        name = self._custom.name if self._custom else dataset
        augmentation = resolve_augment(augment, name, info[1])
        mixing = Mixing.from_config(mixup, cutmix, mix_prob, name, info[1])
        if normalize not in NORMALIZATIONS:
            raise KDConfigError(
                f"unknown normalize={normalize!r}. Valid values: standard (zero mean, unit "
                f"variance), unit (pixels in [0, 1]), none (pixels 0..255).")
        if normalize != "standard" and dataset in ("mnist1d", "digits"):
            raise KDConfigError(
                f"normalize={normalize} applies to the image sets read from their 8-bit pixels "
                f"(mnist, fashion_mnist, cifar10, cifar100); {dataset} comes preprocessed. Use "
                f"normalize=standard.")
        self.save_hyperparameters()
        self.dataset, self.root, self.download = dataset, root, download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or max(batch_size, 500)
        self.train_subset, self.subset_seed = train_subset, subset_seed
        self.train_subset_per_class = train_subset_per_class
        self.unlabelled = unlabelled
        self.val_split, self.split_seed = val_split, split_seed
        self.augment, self.normalize, self.batched = augmentation, normalize, batched
        #: MixUp/CutMix of the training batches (None: off)
        self.mixing = mixing
        self.num_workers, self.drop_last = num_workers, drop_last
        self.batches_per_step = batches_per_step
        self.source_options = dict(source_options or {})
        self._splits: Splits | None = None
        self.train_dataset: IndexedTensorDataset | None = None
        self.val_dataset: IndexedTensorDataset | None = None
        self.test_dataset: IndexedTensorDataset | None = None
        #: source positions the training loader serves (labelled and unlabelled), sorted
        self.train_indices: np.ndarray | None = None
        #: the labelled ones (the stratified subset, or the whole training split)
        self.labelled_indices: np.ndarray | None = None
        #: the unlabelled transfer examples (empty without ``unlabelled``)
        self.unlabelled_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None
        if not download:
            # load now (all sets are in memory anyway) so that missing files or an impossible
            # subset are reported before a Trainer, a logger or a run directory exists
            self._draw_indices()
            if not isinstance(augmentation, str):  # each transform runs on a few training images
                augmentation.check(self.splits().x_train[self.train_indices[:4]])

    # ---- facts for linking ---------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        if self._custom is not None:
            return self._custom.num_classes
        return DATASET_INFO[self.dataset][0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self._custom is not None:
            return self._custom.input_shape
        return source_input_shape(self.dataset, self.source_options) or DATASET_INFO[self.dataset][1]

    @property
    def num_unlabelled(self) -> int:
        """Number of unlabelled transfer examples in the training set (0 without them)."""
        if self.unlabelled is None:
            return 0
        if self.unlabelled_indices is None:
            self._draw_indices()
        return len(self.unlabelled_indices)

    @property
    def deterministic_train(self) -> bool:
        """True when a training example always maps to the same input tensor (no augmentation,
        no mixing), so per-example teacher outputs can be cached."""
        return isinstance(self.augment, str) and self.augment == "none" and self.mixing is None

    @property
    def deterministic_eval(self) -> bool:
        """True: a validation or test example always maps to the same input tensor (they are
        never augmented), so a fit may keep the frozen teacher's logits of each validation
        batch. A subclass whose evaluation loaders draw random inputs must return False."""
        return True

    # ---- data ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.download and self._custom is None:  # fetch once on rank 0; setup() then reads the files on every rank
            load_source(self.dataset, self.root, download=True, options=self.source_options)

    def splits(self) -> Splits:
        if self._splits is None and self._custom is not None:
            self._splits = self._custom.splits()
        if self._splits is None:
            self._splits = load_source(self.dataset, self.root, download=False,
                                       options=self.source_options)
        return self._splits

    def _dataset(self, x, y, indices, augment: str = "none") -> IndexedTensorDataset:
        s = self.splits()
        return IndexedTensorDataset(x, y, indices, s.mean, s.std, augment=augment,
                                    normalize=self.normalize)

    def _draw_indices(self) -> None:
        """Validation split, (stratified) labelled subset and unlabelled transfer subset: pure
        functions of the config."""
        s = self.splits()
        pool, val = train_val_split(len(s.y_train), self.val_split, self.split_seed)
        labelled, unlabelled = pool, pool[:0]
        if self.train_subset is not None or self.train_subset_per_class is not None:
            draw, size = ((stratified_subset, self.train_subset) if self.train_subset is not None
                          else (stratified_subset_per_class, self.train_subset_per_class))
            chosen = draw(s.y_train[pool].numpy(), size, self.subset_seed, s.num_classes,
                          s.class_names)
            labelled = pool[chosen]
            if self.unlabelled is not None:
                unlabelled = pool[unlabelled_subset(len(pool), chosen, self.unlabelled,
                                                    self.subset_seed)]
        self.labelled_indices, self.unlabelled_indices = labelled, unlabelled
        self.train_indices = np.union1d(labelled, unlabelled).astype(np.int64)
        self.val_indices = val

    def _train_labels(self):
        """The training split's labels as the training loader serves them: ``UNLABELLED`` at
        the unlabelled transfer examples."""
        y = self.splits().y_train
        if not len(self.unlabelled_indices):
            return y
        y = y.clone()
        y[self.unlabelled_indices] = UNLABELLED
        return y

    def setup(self, stage: str | None = None) -> None:
        s = self.splits()
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            if self.train_indices is None:
                self._draw_indices()
            self.train_dataset = self._dataset(s.x_train, self._train_labels(), self.train_indices,
                                               augment=self.augment)
            self.val_dataset = self._dataset(s.x_train, s.y_train, self.val_indices)
            self._check_ranks_agree()
            self._write_subset_indices()
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._dataset(s.x_test, s.y_test, None)

    def _check_ranks_agree(self) -> None:
        """Under DDP, every rank must train on the same subset (it is a pure function of the
        config, so this only fails if the ranks were configured differently)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size < 2:
            return
        drawn = np.concatenate([self.labelled_indices, [-1], self.unlabelled_indices])
        digest = hashlib.sha1(np.ascontiguousarray(drawn, dtype=np.int64).tobytes()).hexdigest()
        if trainer.strategy.broadcast(digest, src=0) != digest:
            raise KDConfigError(
                f"rank {trainer.global_rank} drew a different training subset than rank 0; give "
                f"every process the same data.train_subset / data.train_subset_per_class / data.subset_seed / data.unlabelled / "
                f"data.val_split.")

    def _write_subset_indices(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.logger is None or self.labelled_indices is None:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or log_dir is None:
            return
        path = Path(log_dir) / "train_subset.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "dataset": self.dataset, "train_subset": self.train_subset,
            "train_subset_per_class": self.train_subset_per_class,
            "subset_seed": self.subset_seed, "val_split": self.val_split,
            "split_seed": self.split_seed, "num_examples": int(len(self.labelled_indices)),
            "indices": [int(i) for i in self.labelled_indices],
            "unlabelled": self.unlabelled, "num_unlabelled": int(len(self.unlabelled_indices)),
            "unlabelled_indices": [int(i) for i in self.unlabelled_indices]}, default=repr))

    def _loader(self, ds: IndexedTensorDataset, batch_size: int, shuffle: bool,
                drop_last: bool = False, group: int = 1) -> DataLoader:
        if group > 1:
            # k minibatches per loader item: the sampler's order is independent of the batch
            # size, so the groups hold exactly the batches a k = 1 loader would yield, in order
            grouped = MinibatchGroups(ds if self.batched else PerSampleDataset(ds), batch_size, drop_last)
            return DataLoader(grouped, batch_size=batch_size * group, shuffle=shuffle,
                              collate_fn=batch_collate, **self._worker_options())
        if self.batched:
            return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                              collate_fn=batch_collate, **self._worker_options())
        return DataLoader(PerSampleDataset(ds), batch_size=batch_size, shuffle=shuffle,
                          drop_last=drop_last, **self._worker_options())

    def _worker_options(self) -> dict:
        if self._custom is not None:
            return self._custom.loader_options(self.num_workers, self.trainer)
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.batch_size, True, self.drop_last,
                            group=self.batches_per_step)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset, "validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset, "test")

    def _eval_loader(self, ds: IndexedTensorDataset, split: str) -> DataLoader:
        """Under DDP every example is evaluated exactly once: rank r takes examples r, r + R,
        r + 2R, ... (Lightning's ``UnrepeatedDistributedSampler``) instead of the
        ``DistributedSampler`` Lightning would inject, which pads the split with repeated examples
        so every rank gets as many. Ranks may then run one batch more than others; the metrics
        allow it (torchmetrics and epoch-level ``sync_dist`` reduce once, at the epoch end)."""
        loader = self._loader(ds, self.eval_batch_size, False)
        trainer = getattr(self, "trainer", None)
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not kwargs or kwargs.get("num_replicas", 1) < 2 or not len(ds):
            return loader
        from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

        if len(ds) < kwargs["num_replicas"]:
            raise KDConfigError(
                f"the {split} split has {len(ds)} examples, fewer than the {kwargs['num_replicas']} "
                f"processes that evaluate it; use fewer devices or a larger split.")
        sampler = UnrepeatedDistributedSampler(loader.dataset, shuffle=False, **kwargs)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                          collate_fn=loader.collate_fn, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def labelled_train_dataloader(self) -> DataLoader:
        """The labelled training examples (the few-data subset, or the whole training split), each
        once, in order, without augmentation or mixing, at the evaluation batch size and sharded
        across DDP ranks like the validation split: to measure a network on the data it was
        trained on (the distillation error at the end of a fit). ``None`` when ``setup`` drew no
        labelled subset (a subclass that builds its own training set)."""
        if self.labelled_indices is None:
            return None
        s = self.splits()
        return self._eval_loader(self._dataset(s.x_train, s.y_train, self.labelled_indices), "training")

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """An ``(x, y, index)`` batch, or a group of them, moved in one call
        (:func:`~kd_lightning.training.grouping.move_batch`); anything else as Lightning moves it."""
        moved = move_batch(batch, device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx) if moved is None else moved

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches, on their device: the transform pipeline, the scaling, then
        MixUp/CutMix (:mod:`kd_lightning.data.augment`); other batches pass unchanged."""
        trainer = getattr(self, "trainer", None)
        if (isinstance(self.augment, str) and self.mixing is None) or trainer is None or not trainer.training:
            return batch
        device_augment = None if isinstance(self.augment, str) else self.augment
        return augment_training_batch(batch, device_augment, self.train_dataset.finish, self.mixing)

    def state_dict(self) -> dict:
        return {"train_subset": self.train_subset, "train_subset_per_class": self.train_subset_per_class,
                "subset_seed": self.subset_seed,
                "unlabelled": self.unlabelled, "dataset": self.dataset,
                "batches_per_step": self.batches_per_step}

    def load_state_dict(self, state_dict: dict) -> None:
        # the subset is a pure function of the configuration; refuse to silently change it
        for key in ("dataset", "train_subset", "train_subset_per_class", "subset_seed", "unlabelled"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise KDConfigError(
                    f"the checkpoint was trained with data.{key}={state_dict[key]!r} but this run "
                    f"has data.{key}={getattr(self, key)!r}; resume with the same data settings.")
        saved_k = state_dict.get("batches_per_step", 1)
        trainer = getattr(self, "trainer", None)
        resuming_fit = trainer is None or trainer.state.fn == "fit"  # test/predict: irrelevant
        if resuming_fit and (saved_k > 1) != (self.batches_per_step > 1):
            # k > 1 trains with manual optimisation, whose step counter is stored separately
            raise KDConfigError(
                f"the checkpoint was trained with data.batches_per_step={saved_k} but this run has "
                f"data.batches_per_step={self.batches_per_step}; switching between 1 and > 1 "
                f"loses the step count. Resume with data.batches_per_step={saved_k}.")




def _check_unlabelled(unlabelled, train_subset: int | None) -> int | str | None:
    """``unlabelled`` as the data module keeps it: a count >= 1, ``"rest"``, or ``None``
    (``train_subset``: the labelled budget, a total or per class; ``None``: the full split)."""
    if unlabelled is None:
        return None
    if isinstance(unlabelled, bool) or not isinstance(unlabelled, (int, str)):
        raise KDConfigError(f"unlabelled={unlabelled!r}: give a number of unlabelled examples, "
                            f"'rest' or null.")
    if isinstance(unlabelled, str) and unlabelled != "rest":
        raise KDConfigError(f"unlabelled={unlabelled!r}: give a number of unlabelled examples, "
                            f"'rest' (every training example outside the labelled subset) or null.")
    if isinstance(unlabelled, int) and unlabelled < 0:
        raise KDConfigError(f"unlabelled={unlabelled} is negative; give a number of unlabelled "
                            f"examples >= 0, 'rest' or null.")
    if unlabelled == 0:
        return None
    if train_subset is None:
        raise KDConfigError(
            f"unlabelled={unlabelled!r} needs train_subset: without it every training example is "
            f"labelled and none is left to use unlabelled. Set train_subset (M labelled "
            f"examples) or train_subset_per_class (M per class); the unlabelled ones are drawn "
            f"from the rest of the training split.")
    return unlabelled
