"""Wasserstein-ball KD for few-data students: Kong, "Learning Student Network with Few Data", 2020."""

from __future__ import annotations

import math

import torch

from kd_lightning import KDConfigError
from kd_lightning.losses import kd_loss, labelled_cross_entropy, wasserstein_kd_loss
from kd_lightning.methods.base import DistillationModule, Losses
from kd_lightning.methods.checks import check_temperature, check_weights


class NonFiniteGradientError(KDConfigError):
    """A loss term's gradient became nan/inf during training (reported as one paragraph)."""


class WassersteinKD(DistillationModule):
    r"""Kong et al.'s distributionally robust distillation ("Learning Student Network with Few
    Data", 2020, Eq. 2):

    .. math::
        L = w_{kd}\, L_W + w_{ce}\, CE(y, z_s),\qquad
        L_W = \frac{1}{B} \sum_i l(o_S(x_i), o_T(x_i))
              + \epsilon \frac{1}{B} \sum_i \|\nabla_{x_i} l(o_S(x_i), o_T(x_i))\|_p

    with :math:`l(o^S, o^T) = T^2 \mathrm{KL}(\sigma(o^T/T) \| \sigma(o^S/T))` the per-example
    response-KD loss (Hinton et al. 2015). As in Eq. (2), :math:`l` is a function of :math:`x_i`
    through both networks, so the input gradient runs through the student and the frozen teacher
    (its weights get no gradient; at eps > 0 its forward runs on every step, so the teacher cache
    is not used). The penalty is built with ``create_graph=True`` (double backpropagation), so it
    trains the student. The paper's objective has no label term (``ce_weight = 0``) and its
    temperature "is usually set to one" (``temperature = 1``): those are the defaults.

    ``penalty_through_teacher=False`` is the student-only variant: the teacher's output is a
    constant target (from the per-example cache), so the penalty measures the student's own
    sensitivity; it is cheaper (no teacher forward or backward in the step) but not Eq. (2).
    With ``eps = 0`` both are :class:`~kd_lightning.methods.ResponseKD`, and the step is its step:
    no input gradient is taken (it would weigh nothing) and the teacher's logits come from the
    per-example cache where the inputs allow it, as in ResponseKD, so it costs what a KD step
    costs and ``grad_norm`` is not logged.

    Under ``bf16-mixed`` the networks run in bf16 (autocast) while the loss, the input gradient's
    norm and the penalty are computed in float32. The input batch is never modified (the method
    differentiates a detached alias of it). If the input gradient is ever non-finite, training
    stops with :class:`NonFiniteGradientError` naming the global step, before the optimizer step,
    so the last good checkpoint is kept (one scalar synchronisation per step, plus a one-scalar
    all-reduce under DDP so that every rank stops at the same step).

    Logged terms: ``loss`` (total), ``loss_w`` and ``loss_ce`` (weighted), ``loss_kd`` (mean of
    ``l``) and ``grad_norm`` (mean :math:`\|\nabla_{x_i} l\|_p`).

    Args:
        eps: radius :math:`\epsilon \ge 0` of the Wasserstein ball (weight of the gradient term),
            in the units of the (normalised) inputs; default 1. Its best value depends on the input
            scale and on the amount of data; choose it on validation data (the study can, per M).
        temperature: temperature ``T`` of ``l`` (default 1, as in the paper).
        ce_weight: weight of the cross-entropy on the labels (default 0: Eq. 2 has none).
        kd_weight: weight of :math:`L_W` (default 1).
        norm_p: order ``p`` of the input-gradient norm (default 2; 1 and ``inf`` also make sense,
            see :func:`~kd_lightning.losses.wasserstein_kd_loss`).
        penalty_through_teacher: differentiate :math:`l` through the teacher too (default true,
            Eq. 2); false gives the student-only penalty, which keeps the teacher cache.
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule`.
    """

    requires_teacher = True

    def __init__(self, eps: float = 1.0, temperature: float = 1.0, ce_weight: float = 0.0,
                 kd_weight: float = 1.0, norm_p: float = 2.0, penalty_through_teacher: bool = True,
                 **kwargs) -> None:
        if not eps >= 0:
            raise KDConfigError(
                f"WassersteinKD: eps must be >= 0, got {eps}. It is the radius of the Wasserstein "
                f"ball around the training examples (the weight of the input-gradient penalty); "
                f"0 gives plain response KD.")
        check_temperature("WassersteinKD", temperature)
        check_weights("WassersteinKD", ce_weight=ce_weight, kd_weight=kd_weight)
        if not (norm_p >= 1 or math.isinf(norm_p)):
            raise KDConfigError(f"WassersteinKD: norm_p must be >= 1 or inf, got {norm_p} (default "
                                f"2, the Euclidean norm of each example's input gradient).")
        super().__init__(**kwargs)
        self.eps, self.temperature = eps, temperature
        self.ce_weight, self.kd_weight, self.norm_p = ce_weight, kd_weight, norm_p
        self.penalty_through_teacher = penalty_through_teacher
        if penalty_through_teacher and eps > 0 and self.teacher_cache is None:
            self.teacher_cache = False  # the penalty runs the teacher on every step anyway

    def compute_losses(self, x, y, index):
        if self.eps == 0:  # L_W is the mean of l alone: the objective without its penalty
            logits = self.student(x)
            per_example = kd_loss(logits, self.teacher_logits(x, index), self.temperature, reduction="none")
            loss_kd = per_example.mean(dtype=torch.promote_types(per_example.dtype, torch.float32))
            return Losses(logits, self._terms(loss_kd, logits, y), {"loss_kd": loss_kd})
        x = x.detach()  # a new tensor object: requires_grad never reaches the data set's tensors
        if not x.is_floating_point():
            x = x.float()
        x.requires_grad_(True)
        logits = self.student(x)
        if self.penalty_through_teacher:  # l(o_S(x), o_T(x)) as a function of x through both nets
            t_logits = self.frozen_teacher.outputs_with_input_gradient(x)
        else:
            t_logits = self.teacher_logits(x.detach(), index)
        per_example = kd_loss(logits, t_logits, self.temperature, reduction="none",
                              detach_teacher=not self.penalty_through_teacher)
        loss_w, loss_kd, grad_norm = wasserstein_kd_loss(per_example, x, self.eps, self.norm_p)
        self._check_finite(grad_norm)
        return Losses(logits, self._terms(loss_w, logits, y), {"loss_kd": loss_kd, "grad_norm": grad_norm})

    def _terms(self, loss_w, logits, y) -> dict:
        terms = {"loss_w": self.kd_weight * loss_w}
        if self.ce_weight > 0:
            terms["loss_ce"] = self.ce_weight * labelled_cross_entropy(logits, y)
        return terms

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
