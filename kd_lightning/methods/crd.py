"""Contrastive representation distillation: Tian, Krishnan & Isola, "Contrastive Representation
Distillation", ICLR 2020."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from kd_lightning import KDConfigError
from kd_lightning.losses.crd import CRDEmbed, CRDMemoryBank, crd_loss
from kd_lightning.methods.base import Losses
from kd_lightning.methods.feature import FeatureDistillation, Shape


class _ApplyBankUpdate(pl.Callback):
    """Applies the step's memory-bank update once its loss has been backpropagated (the scores
    were computed from the bank, so it must not change in place before the backward pass)."""

    def on_after_backward(self, trainer: pl.Trainer, pl_module: CRD) -> None:
        pl_module.apply_bank_update()


class CRD(FeatureDistillation):
    r"""Contrastive representation distillation (Tian et al., 2020), single stage.

    The penultimate features of both networks (the input of the classifier ``fc``) are embedded
    by one :class:`~kd_lightning.losses.CRDEmbed` head each (linear to ``embed_dim``, L2
    normalised; both heads train with the student) and contrasted with noise-contrastive
    estimation against a memory bank (:class:`~kd_lightning.losses.CRDMemoryBank`) of the
    embeddings of every training example: the student embedding of an example should score high
    against the teacher's stored embedding of the *same* example and low against those of ``K``
    negatives, and symmetrically for the teacher embedding against the student bank
    (:func:`~kd_lightning.losses.crd_loss`). The loss is the paper's plain CRD:

    .. math:: L = w_{ce}\, CE + \beta\, L_{CRD}

    with :math:`\beta` = ``transfer_weight`` = 0.8 and no KD term (``kd_weight > 0`` gives the
    paper's CRD+KD, with ``kd_weight: 1``). After each step's backward pass the bank rows of the
    batch are updated with momentum :math:`\mu` (``bank_momentum``).

    **Bank and negatives.** The bank has one row per example of the training *source* (the
    batch's ``index`` is the position there; its size comes from the data module at ``setup``,
    or from ``num_data``). With a few-data subset only the subset's rows are used: at the start
    of training the negative pool is set to the subset's indices, and with
    ``class_aware_negatives`` (the reference code's CIFAR-100 setting) to examples of other
    classes. ``K`` is clamped to the number of candidates an example has (the pool minus its own
    class, or minus itself), with a warning: with M = 500 MNIST-1D examples of 10 classes that is
    450. Unlabelled training examples (``data.unlabelled``, label -1) are in the pool and in the
    bank like the others; their class is unknown, so with ``class_aware_negatives`` an unlabelled
    anchor draws its negatives uniformly and an unlabelled example is a candidate negative for
    every anchor. The contrastive term uses every row, the cross-entropy the labelled ones.
    The bank (``bank.memory_s``, ``bank.memory_t``, ``bank.log_z``) consists of persistent
    buffers, so checkpoints hold it (``2 N D`` floats: 51 MB for CIFAR-100) and a resumed run
    continues with the same bank; the draw counter of the negative sampler is saved too.

    **DDP.** Every rank holds the whole bank and keeps it identical by applying the same updates
    (see :mod:`kd_lightning.losses.crd`): indices, labels and the detached embeddings of all
    ranks are all-gathered (``self.all_gather``), every rank draws the negatives of the gathered
    batch from a generator seeded alike (``sampling_seed`` and the draw count) and keeps its own
    rows, the loss uses the local rows, the NCE constants are averaged over ranks, and every rank
    applies the gathered update. The bank is never communicated, so DDP's per-step buffer
    broadcast is not needed: ``DDPStrategy(broadcast_buffers=False)`` saves sending ``2 N D``
    floats per step.

    Logged terms (weighted): ``loss``, ``loss_ce`` (and ``loss_kd``), ``loss_crd``.

    Args:
        student_layer: module path of the student's embedding (default ``fc``; with
            ``layer_input`` its *input* is tapped, the pooled penultimate feature).
        teacher_layer: the same for the teacher; default: ``student_layer``.
        layer_input: tap the modules' inputs (default true) instead of their outputs.
        transfer_weight: :math:`\beta` (0.8 on CIFAR-100, the paper).
        embed_dim: embedding dimension ``D`` (128, the paper).
        num_negatives: ``K`` negatives per example (16384 on CIFAR-100, the paper).
        nce_temperature: :math:`\tau` of the scores (0.07, the paper).
        bank_momentum: :math:`\mu` of the bank update (0.5, the paper).
        class_aware_negatives: draw negatives only from other classes (default true, the
            reference code's CIFAR-100 setting); false: uniformly among all other examples.
        sampling_seed: seed of the negative sampler and of the bank's initial rows (the same on
            every DDP rank).
        num_data: number of rows of the bank (the length of the training source); default: taken
            from the data module at ``setup`` and saved in the hyperparameters.
        ce_weight: weight of the cross-entropy (default 1).
        kd_weight: weight of Hinton KD (default 0: plain CRD).
        **kwargs: ``temperature`` (of KD), ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, student_layer: str = "fc", teacher_layer: str | None = None,
                 layer_input: bool = True, transfer_weight: float = 0.8, embed_dim: int = 128,
                 num_negatives: int = 16384, nce_temperature: float = 0.07,
                 bank_momentum: float = 0.5, class_aware_negatives: bool = True,
                 sampling_seed: int = 0, num_data: int | None = None, ce_weight: float = 1.0,
                 kd_weight: float = 0.0, **kwargs) -> None:
        if not isinstance(student_layer, str) or \
                not (teacher_layer is None or isinstance(teacher_layer, str)):
            raise KDConfigError(f"CRD takes one module path per network (its embedding, e.g. "
                                f"student_layer: fc with layer_input: true), got student_layer="
                                f"{student_layer!r}, teacher_layer={teacher_layer!r}.")
        for name, value, hint in (("embed_dim", embed_dim, "128"), ("num_negatives", num_negatives, "16384")):
            if int(value) < 1:
                raise KDConfigError(f"CRD: {name} must be a positive integer (the paper uses {hint} "
                                    f"on CIFAR-100), got {value}.")
        if not nce_temperature > 0:
            raise KDConfigError(f"CRD: nce_temperature must be > 0 (the paper uses 0.07), got "
                                f"{nce_temperature}.")
        if not 0.0 <= bank_momentum < 1.0:
            raise KDConfigError(f"CRD: bank_momentum must be in [0, 1) (the paper uses 0.5), got "
                                f"{bank_momentum}.")
        if num_data is not None and int(num_data) < 2:
            raise KDConfigError(f"CRD: num_data (rows of the memory bank = length of the training "
                                f"source) must be >= 2, got {num_data}; leave it null to take it "
                                f"from the data module.")
        super().__init__(transfer_weight=transfer_weight, ce_weight=ce_weight, kd_weight=kd_weight,
                         **kwargs)
        self.embed_dim, self.num_negatives = int(embed_dim), int(num_negatives)
        self.nce_temperature, self.bank_momentum = float(nce_temperature), float(bank_momentum)
        self.class_aware_negatives, self.sampling_seed = bool(class_aware_negatives), int(sampling_seed)
        self.embed_s: CRDEmbed | None = None
        self.embed_t: CRDEmbed | None = None
        self.bank: CRDMemoryBank | None = None
        #: negatives drawn so far (seeds the sampler of the next step; saved in checkpoints)
        self.negative_draws = 0
        self._generator: torch.Generator | None = None
        self._negatives_per_example: int | None = None  # K after clamping, fixed during a fit
        self._pending_update: tuple[Tensor, Tensor, Tensor] | None = None
        self.init_features([student_layer], [teacher_layer or student_layer], pre_activation=layer_input)
        if num_data is not None:
            self._build_bank(int(num_data))

    # ---- modules ------------------------------------------------------------------------------
    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        (s,), (t,) = student_shapes, teacher_shapes
        self.embed_s = CRDEmbed(math.prod(s), self.embed_dim)
        self.embed_t = CRDEmbed(math.prod(t), self.embed_dim)

    def _build_bank(self, num_data: int) -> None:
        generator = torch.Generator().manual_seed(self.sampling_seed)
        self.bank = CRDMemoryBank(num_data, self.embed_dim, self.nce_temperature, self.bank_momentum,
                                  generator=generator)
        self.hparams["num_data"] = num_data  # so load_from_checkpoint rebuilds the bank

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        source = _training_source_size(dm)
        if self.bank is None:
            if source is None:
                raise KDConfigError(
                    "CRD needs the number of training examples for its memory bank: train with a "
                    "DistillDataModule or set model.init_args.num_data to the length of the "
                    "training source (the batches' index runs over it).")
            self._build_bank(source)
        elif source is not None and source != self.bank.num_data:
            raise KDConfigError(
                f"CRD: the memory bank has {self.bank.num_data} rows (num_data) but the data "
                f"module's training source has {source} examples; remove num_data (it is then "
                f"taken from the data) or set it to {source}.")

    def mixing_refusal(self) -> str | None:
        if self.class_aware_negatives:
            return ("class_aware_negatives draws each anchor's negatives from the other classes, "
                    "and a mixed input has two classes. Set model.init_args.class_aware_negatives: "
                    "false (uniform negatives, the paper's description) or turn mixing off.")
        return None

    def on_train_start(self) -> None:
        super().on_train_start()
        ds = getattr(getattr(self.trainer, "datamodule", None), "train_dataset", None)
        if ds is not None and hasattr(ds, "indices") and hasattr(ds, "y"):
            indices = torch.as_tensor(ds.indices).long()
            self.bank.set_negative_pool(indices, torch.as_tensor(ds.y)[indices])
        elif self.class_aware_negatives:
            raise KDConfigError("CRD: class_aware_negatives needs the training examples' labels "
                                "from a DistillDataModule; set class_aware_negatives: false to draw "
                                "negatives uniformly.")
        k = self._negatives_per_example = self.negatives_per_example()
        if k < self.num_negatives:
            rank_zero_warn(
                f"CRD: num_negatives={self.num_negatives} but each training example has only {k} "
                f"candidate negatives ({self.bank.num_candidates} examples in the pool"
                f"{', fewer those of its class' if self.class_aware_negatives else ''}); using "
                f"K={k}. (Few-data runs have small pools; the paper's K=16384 is for the 50000 "
                f"CIFAR-100 training images.)", category=UserWarning)

    def on_train_end(self) -> None:
        super().on_train_end()
        self._negatives_per_example = None

    def extra_callbacks(self) -> list[pl.Callback]:
        return [_ApplyBankUpdate()]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["crd_negative_draws"] = self.negative_draws

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.negative_draws = int(checkpoint.get("crd_negative_draws", 0))

    # ---- negatives -----------------------------------------------------------------------------
    def negatives_per_example(self) -> int:
        """``K`` clamped to the fewest candidate negatives an example of the pool has."""
        labels = self.bank.pool_labels
        n = self.bank.num_candidates
        if self.class_aware_negatives and labels is not None:
            known = labels[labels >= 0]  # unlabelled examples (-1) are candidates for every class
            available = n - (int(torch.bincount(known).max()) if known.numel() else 0)
        else:
            available = n - 1
        if available < 1:
            raise KDConfigError(
                f"CRD: no negatives are available ({n} training examples"
                f"{' all of one class' if self.class_aware_negatives else ''}); train on more "
                f"examples{' or set class_aware_negatives: false' if self.class_aware_negatives else ''}.")
        return min(self.num_negatives, available)

    def _sampler(self) -> torch.Generator:
        """The negative sampler for this step: seeded from ``sampling_seed`` and the number of
        draws so far, so every DDP rank (and a resumed run) draws the same negatives."""
        device = self.bank.memory_s.device
        if self._generator is None or torch.device(self._generator.device) != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.sampling_seed * 1_000_003 + self.negative_draws)
        self.negative_draws += 1
        return self._generator

    # ---- DDP helpers ---------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer_or_none
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _gather(self, *tensors: Tensor) -> list[Tensor]:
        """Each tensor of every rank, concatenated in rank order (unchanged on one process)."""
        if self._world()[0] == 1:
            return list(tensors)
        return [self.all_gather(t).flatten(0, 1) for t in tensors]

    def _mean_over_ranks(self, value: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(value, reduce_op="mean")

    # ---- the step ------------------------------------------------------------------------------
    def apply_bank_update(self) -> None:
        """Write the last step's (gathered) embeddings into the bank."""
        if self._pending_update is not None:
            indices, v_s, v_t = self._pending_update
            self._pending_update = None
            self.bank.update(indices, v_s, v_t)

    def compute_losses(self, x, y, index):
        if self.bank is None:
            raise KDConfigError("CRD: the memory bank is not built yet; set num_data or train with "
                                "a DistillDataModule (the bank is built at setup).")
        self.apply_bank_update()  # a step computed without a backward pass still updates the bank
        logits, (f_s,) = self.student_forward(x)
        t_logits, (f_t,) = self.teacher_forward(x, index)
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        world, rank = self._world()
        idx_all, vs_all, vt_all = self._gather(index, v_s.detach(), v_t.detach())
        targets = self._gather(y)[0] if self.class_aware_negatives else None
        k = self._negatives_per_example or self.negatives_per_example()
        negatives = self.bank.sample_negatives(idx_all, k, self._sampler(), targets=targets)
        b = index.shape[0]
        negatives = negatives[rank * b:(rank + 1) * b]  # this rank's examples
        logits_s, logits_t = self.bank.logits(v_s, v_t, index, negatives)
        log_z_s, log_z_t = self.bank.log_normalisers(
            logits_s, logits_t, reduce=self._mean_over_ranks if world > 1 else None)
        crd = crd_loss(logits_s, logits_t, log_z_s, log_z_t, self.bank.num_candidates)
        terms = self.task_terms(logits, y, x, index, t_logits)
        terms["loss_crd"] = self.transfer_weight * crd
        self._pending_update = (idx_all, vs_all, vt_all)
        return Losses(logits, terms)


def _training_source_size(dm) -> int | None:
    """Rows of the training source the batches' ``index`` refers to (``None`` if unknown)."""
    ds = getattr(dm, "train_dataset", None)
    if ds is not None and hasattr(ds, "y"):
        return len(ds.y)
    splits = getattr(dm, "splits", None)
    if callable(splits):
        return len(splits().y_train)
    return None
