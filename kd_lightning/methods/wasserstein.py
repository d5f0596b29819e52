"""Wasserstein-ball KD for few-data students: Kong, "Learning Student Network with Few Data" (seed 004)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kd_lightning import KDConfigError
from kd_lightning.losses import kd_loss, wasserstein_kd_loss
from kd_lightning.methods.base import DistillationModule, Losses, check_temperature, check_weights


class NonFiniteGradientError(KDConfigError):
    """A loss term's gradient became nan/inf during training (reported as one paragraph)."""


class WassersteinKD(DistillationModule):
    r"""Kong et al.'s distributionally robust distillation (seed 004, eq. 2), plus cross-entropy:

    .. math::
        L = w_{ce}\, CE(y, z_s) + w_{kd}\, L_W,\qquad
        L_W = \frac{1}{B} \sum_i l(o_i^S, o_i^T)
              + \epsilon \frac{1}{B} \sum_i \|\nabla_{x_i} l(o_i^S, o_i^T)\|_p

    with :math:`l(o^S, o^T) = T^2 \mathrm{KL}(\sigma(o^T/T) \| \sigma(o^S/T))` the per-example
    response-KD loss (Hinton et al. 2015). The input gradient is built with ``create_graph=True``
    (double backpropagation), so the penalty trains the student to vary slowly around each
    example. With ``eps = 0`` this is exactly :class:`~kd_lightning.methods.ResponseKD` with
    ``alpha = kd_weight`` when ``ce_weight = 1 - kd_weight`` (the defaults, 0.1 / 0.9).

    The teacher output :math:`o^T` is a constant target: it comes from the per-example cache (or
    a no-grad forward) and the gradient w.r.t. :math:`x_i` flows through the student only. The
    frozen teacher's own sensitivity to the input is not something the student can change, and
    leaving it out keeps the teacher cache usable (no teacher forward or backward in the step).
    Under ``bf16-mixed`` the student runs in bf16 (autocast) while the loss, the input gradient's
    norm and the penalty are computed in float32.

    The input batch is never modified: the method takes a detached alias of it (integer inputs
    are converted to float first) and makes that alias require gradient. If the input gradient
    is ever non-finite, training stops with :class:`NonFiniteGradientError` naming the global
    step, before the optimizer step, so the last good checkpoint is kept. The check costs one
    scalar synchronisation per step (plus a one-scalar all-reduce under DDP, so that every rank
    stops at the same step).

    Logged terms: ``loss`` (total), ``loss_ce`` and ``loss_w`` (weighted), ``loss_kd`` (mean of ``l``)
    and ``grad_norm`` (mean :math:`\|\nabla_{x_i} l\|_p`).

    Args:
        eps: radius :math:`\epsilon \ge 0` of the Wasserstein ball (weight of the gradient term),
            in the units of the (normalised) inputs; default 1. Its best value depends on the input
            dimension and scale and shrinks as the training set grows: on MNIST-1D validation
            sweeps picked 2 for M = 100-500 examples (10 collapses training) and 0.3 for the full
            3600. Choose it on validation data for a new data set.
        temperature: temperature ``T`` of the response-KD loss (default 4).
        ce_weight: weight of the cross-entropy on the labels (default 0.1).
        kd_weight: weight of :math:`L_W` (default 0.9).
        norm_p: order ``p`` of the input-gradient norm (default 2; 1 and ``inf`` also make sense,
            see :func:`~kd_lightning.losses.wasserstein_kd_loss`).
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule`.
    """

    requires_teacher = True

    def __init__(self, eps: float = 1.0, temperature: float = 4.0, ce_weight: float = 0.1,
                 kd_weight: float = 0.9, norm_p: float = 2.0, **kwargs) -> None:
        if not eps >= 0:
            raise KDConfigError(
                f"WassersteinKD: eps must be >= 0, got {eps}. It is the radius of the Wasserstein "
                f"ball around the training examples (the weight of the input-gradient penalty); "
                f"0 gives plain response KD; the MNIST-1D configs use 0.3 (full data) and 2 (few data).")
        check_temperature("WassersteinKD", temperature)
        check_weights("WassersteinKD", ce_weight=ce_weight, kd_weight=kd_weight)
        if not (norm_p >= 1 or math.isinf(norm_p)):
            raise KDConfigError(f"WassersteinKD: norm_p must be >= 1 or inf, got {norm_p} (default "
                                f"2, the Euclidean norm of each example's input gradient).")
        super().__init__(**kwargs)
        self.eps, self.temperature = eps, temperature
        self.ce_weight, self.kd_weight, self.norm_p = ce_weight, kd_weight, norm_p

    def compute_losses(self, x, y, index):
        x = x.detach()  # a new tensor object: requires_grad never reaches the data set's tensors
        if not x.is_floating_point():
            x = x.float()
        x.requires_grad_(True)
        logits = self.student(x)
        per_example = kd_loss(logits, self.teacher_logits(x.detach(), index), self.temperature,
                              reduction="none")
        loss_w, loss_kd, grad_norm = wasserstein_kd_loss(per_example, x, self.eps, self.norm_p)
        self._check_finite(grad_norm)
        ce = F.cross_entropy(logits.float(), y)
        return Losses(logits, {"loss_ce": self.ce_weight * ce, "loss_w": self.kd_weight * loss_w},
                      {"loss_kd": loss_kd, "grad_norm": grad_norm})

    def _check_finite(self, grad_norm: torch.Tensor) -> None:
        trainer = self.trainer_or_none
        where = ""
        if trainer is not None and trainer.world_size > 1:  # stop every rank at the same step
            bad = (~torch.isfinite(grad_norm.detach())).float()
            bad = bool(trainer.strategy.reduce(bad, reduce_op="sum") > 0)
            where = f" on global rank {trainer.global_rank} (the ranks stop together)"
        else:
            bad = not math.isfinite(grad_norm.item())
        if bad:
            raise NonFiniteGradientError(
                f"WassersteinKD: the input gradient of the distillation loss (term 'grad_norm', "
                f"the mean ||grad_x l|| of the Wasserstein penalty) is {float(grad_norm):g}{where} at "
                f"global step {self.global_step} (epoch {self.current_epoch}). "
                f"Training stopped before this step's optimizer update, so no checkpoint was "
                f"written from it and the last good checkpoint is kept. Usual fixes: lower the "
                f"learning rate or eps (model.init_args.eps={self.eps:g}), train in 32-bit "
                f"precision (--trainer.precision 32), or check the inputs for nan/inf values.")
