"""Logit-based distillation methods that reshape what the student matches in the teacher's output:

- DKD: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022;
- DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022;
- logit standardisation: Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024.
"""

from __future__ import annotations

import torch

from kd_lightning.losses.decoupled import dkd_terms, dkd_warmup_weight
from kd_lightning.losses.dist import dist_terms
from kd_lightning.losses.labels import UNLABELLED, labelled_cross_entropy, mixed
from kd_lightning.losses.logit_standardization import standardized_kd_loss
from kd_lightning.methods.base import DistillationModule, Losses
from kd_lightning.methods.checks import check_temperature, check_weights
from kd_lightning.methods.response import ResponseKD
from kd_lightning.training.epochs import check_epochs, resolve_epochs


class DecoupledKD(DistillationModule):
    r"""Decoupled knowledge distillation, DKD (Zhao et al., CVPR 2022).

    .. math::
        L = w_{ce}\, CE(y, z_s) + w(e)\, \big(\alpha\, \mathrm{TCKD} + \beta\, \mathrm{NCKD}\big),
        \qquad w(e) = \min\big((e + 1) / E_w,\ 1\big)

    Classical KD is :math:`\mathrm{TCKD} + (1 - p^T_t)\, \mathrm{NCKD}`: a target-class term
    (binary KL of the true class's probability against the rest) and a non-target term (KL over
    the other classes' renormalised probabilities), the latter suppressed on examples the teacher
    is confident about. DKD weights the two independently
    (:func:`~kd_lightning.losses.dkd_terms`, both with :math:`T^2`), and ramps the distillation
    term in linearly over the first :math:`E_w` epochs
    (:func:`~kd_lightning.losses.dkd_warmup_weight`). The ramp is a function of
    ``current_epoch`` (0-based), never stored, so a run resumed from a checkpoint continues it
    where it was; it is logged as ``train/dkd_warmup`` with the loss terms (the weight of the
    epoch that closes each logging window).

    Unlabelled examples (``y = -1``): the split into target and non-target classes needs a
    class ``t``; there the teacher's predicted class :math:`\arg\max_k z^T_k` stands in for it
    (KD = TCKD + (1 - p^T_t) NCKD holds for any split, so this is still a decomposition of the
    teacher's response), and the distillation terms use every row; the cross-entropy skips them.

    MixUp/CutMix batches (two labels per input, weights ``lam`` and ``1 - lam``): every term is
    ``lam`` times the term split at the first label plus ``1 - lam`` times the term split at the
    second, as for the cross-entropy.

    Logged terms (weighted): ``loss``, ``loss_ce``, ``loss_tckd`` (:math:`w(e)\,\alpha\,
    \mathrm{TCKD}`), ``loss_nckd`` (:math:`w(e)\,\beta\,\mathrm{NCKD}`).

    Args:
        target_weight: :math:`\alpha`, the weight of TCKD (default 1, the paper's value).
        non_target_weight: :math:`\beta`, the weight of NCKD (default 8, the paper's value for
            a ResNet32x4 teacher on CIFAR-100; the authors use 6 for WRN-40-2 and VGG13 and 2
            for ResNet56 / ResNet110 teachers).
        temperature: :math:`T > 0` (default 4).
        ce_weight: weight of the cross-entropy with the labels (default 1).
        warmup_epochs: :math:`E_w`, epochs of the linear warm-up of the DKD term: an int
            (default 20, the paper's CIFAR-100 value; 0 turns it off) or a float in [0, 1), that
            fraction of ``trainer.max_epochs`` (unrounded, as for
            :class:`~kd_lightning.methods.ReviewKD`).
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule`.
    """

    requires_teacher = True

    def __init__(self, target_weight: float = 1.0, non_target_weight: float = 8.0,
                 temperature: float = 4.0, ce_weight: float = 1.0, warmup_epochs: int | float = 20,
                 **kwargs) -> None:
        check_weights("DecoupledKD", target_weight=target_weight,
                      non_target_weight=non_target_weight, ce_weight=ce_weight)
        check_temperature("DecoupledKD", temperature)
        check_epochs(warmup_epochs, "warmup_epochs", "DecoupledKD")
        super().__init__(**kwargs)
        self.target_weight, self.non_target_weight = target_weight, non_target_weight
        self.temperature, self.ce_weight, self.warmup_epochs = temperature, ce_weight, warmup_epochs

    @property
    def warmup_weight(self) -> float:
        """:math:`w(e)` of the current epoch."""
        epochs = resolve_epochs(self.warmup_epochs, getattr(self.trainer_or_none, "max_epochs", None),
                                "warmup_epochs", "DecoupledKD", exact=True)
        return dkd_warmup_weight(self.current_epoch, epochs)

    def compute_losses(self, x, y, index):
        logits = self.student(x)
        t_logits = self.teacher_logits(x, index)
        # unlabelled rows split at the teacher's predicted class (see the class docstring)
        tckd, nckd = mixed(lambda t: dkd_terms(logits, t_logits, torch.where(
            t == UNLABELLED, t_logits.argmax(-1), t), self.temperature), y)
        w = self.warmup_weight
        return Losses(logits, {"loss_ce": self.ce_weight * labelled_cross_entropy(logits, y),
                               "loss_tckd": (w * self.target_weight) * tckd,
                               "loss_nckd": (w * self.non_target_weight) * nckd})

    def on_train_terms_logged(self) -> None:
        self.log("train/dkd_warmup", self.warmup_weight, on_step=False, on_epoch=True, batch_size=1)


class DIST(DistillationModule):
    r"""DIST: distillation by relations of the predictions (Huang et al., NeurIPS 2022).

    .. math::
        L = w_{ce}\, CE(y, z_s)
            + \beta\, \tau^2 \frac{1}{B} \sum_i \big(1 - \rho(Y^S_{i,:}, Y^T_{i,:})\big)
            + \gamma\, \tau^2 \frac{1}{K} \sum_j \big(1 - \rho(Y^S_{:,j}, Y^T_{:,j})\big)

    with :math:`Y = \mathrm{softmax}(Z / \tau)` and :math:`\rho` the Pearson correlation
    (:func:`~kd_lightning.losses.dist_terms`): the student keeps the teacher's ranking of the
    classes for each example (inter-class relation) and of the examples for each class
    (intra-class relation, within each process's batch under DDP), without matching the
    probabilities themselves -- useful when the teacher is much stronger than the student.

    Logged terms (weighted): ``loss``, ``loss_ce``, ``loss_inter`` (:math:`\beta L_{inter}`),
    ``loss_intra`` (:math:`\gamma L_{intra}`).

    Args:
        inter_weight: :math:`\beta` (default 1, the paper's value).
        intra_weight: :math:`\gamma` (default 1, the paper's value).
        temperature: :math:`\tau > 0` (default 1, the authors' released default).
        ce_weight: :math:`\alpha`, weight of the cross-entropy with the labels (default 1).
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule`.
    """

    requires_teacher = True

    def __init__(self, inter_weight: float = 1.0, intra_weight: float = 1.0,
                 temperature: float = 1.0, ce_weight: float = 1.0, **kwargs) -> None:
        check_weights("DIST", inter_weight=inter_weight, intra_weight=intra_weight,
                      ce_weight=ce_weight)
        check_temperature("DIST", temperature)
        super().__init__(**kwargs)
        self.inter_weight, self.intra_weight = inter_weight, intra_weight
        self.temperature, self.ce_weight = temperature, ce_weight

    def compute_losses(self, x, y, index):
        logits = self.student(x)
        inter, intra = dist_terms(logits, self.teacher_logits(x, index), self.temperature)
        return Losses(logits, {"loss_ce": self.ce_weight * labelled_cross_entropy(logits, y),
                               "loss_inter": self.inter_weight * inter,
                               "loss_intra": self.intra_weight * intra})


class StandardizedKD(ResponseKD):
    r"""KD on standardised logits (Sun et al., CVPR 2024).

    .. math::
        L = w_{ce}\, CE(y, z_s) + w_{kd}\, \tau^2\,
            \mathrm{KL}\big(\sigma(\mathcal{Z}(z_t) / \tau) \,\|\, \sigma(\mathcal{Z}(z_s) / \tau)\big),
        \qquad \mathcal{Z}(z) = \frac{z - \bar z}{\sigma(z)}

    Hinton KD after a Z-score of each logit vector (:func:`~kd_lightning.losses.standardized_kd_loss`):
    the student matches the teacher's logits up to a shift and a positive scale per example,
    i.e. their relations, not their range -- equivalently, each network gets its own per-example
    temperature proportional to the standard deviation of its logits. The cross-entropy sees the
    raw logits.

    Logged terms (weighted): ``loss``, ``loss_ce``, ``loss_kd``.

    Args:
        temperature: the base temperature :math:`\tau > 0` (default 2, the authors' CIFAR-100
            value for most pairs; 3 for a few).
        ce_weight: :math:`w_{ce}` (default 1, the authors' CIFAR-100 setting).
        kd_weight: :math:`w_{kd}` (default 9, the authors' CIFAR-100 setting: the Z-score makes
            the gradients smaller than plain KD's).
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule`.
    """

    def __init__(self, temperature: float = 2.0, ce_weight: float = 1.0, kd_weight: float = 9.0,
                 **kwargs) -> None:
        super().__init__(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, **kwargs)

    def compute_losses(self, x, y, index):
        logits = self.student(x)
        kd = standardized_kd_loss(logits, self.teacher_logits(x, index), self.temperature)
        return Losses(logits, {"loss_ce": self.ce_weight * labelled_cross_entropy(logits, y),
                               "loss_kd": self.kd_weight * kd})
