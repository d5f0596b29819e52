"""Relational KD: Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019."""

from __future__ import annotations

from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.losses import kd_loss, labelled_cross_entropy, rkd_loss
from kd_lightning.methods.base import DistillationModule, Losses
from kd_lightning.methods.checks import check_temperature, check_weights
from kd_lightning.models.taps import FeatureTaps


class RelationKD(DistillationModule):
    r"""RKD on the penultimate embedding, plus cross-entropy and an optional Hinton KD term:

    .. math::
        L = w_{ce}\, CE(y, z_s) + \big(w_d L_{RKD-D}(s, t) + w_a L_{RKD-A}(s, t)\big)
            + w_{kd}\, T^2 \mathrm{KL}(\sigma(z_t/T) \| \sigma(z_s/T))

    where ``s``, ``t`` are the student's and teacher's embeddings of the batch (see
    :func:`~kd_lightning.losses.rkd_loss`). The student matches the distances and angles between
    the examples of a batch, so the two embeddings may have different widths and no connector
    is needed. Relations are those within each process's batch (under DDP, within each rank's
    share). The teacher's logits and embedding come from the per-example teacher cache when the
    training inputs are deterministic (see ``teacher_cache`` / ``teacher_cache_mb``), else from a
    no-grad forward with feature taps; either way they are constants.

    Logged terms: ``loss`` (total), ``loss_ce``, ``loss_rkd`` (weighted), ``loss_rkd_d`` and
    ``loss_rkd_a`` (unweighted), and ``loss_kd`` (weighted) when ``kd_weight > 0``.

    Args:
        distance_weight: :math:`w_d`, weight of the distance-wise term (Park et al.: 25).
        angle_weight: :math:`w_a`, weight of the angle-wise term (Park et al.: 50).
        student_layer, teacher_layer: module paths of the embeddings (forward hooks, see
            :class:`~kd_lightning.models.FeatureTaps`); the tapped feature is flattened per
            example. Default ``None``: the *input* of the network's last ``nn.Linear`` (its
            classifier), i.e. the pooled penultimate embedding -- ``fc`` in every zoo model and in
            torchvision ResNets, ``model.fc`` inside :class:`~kd_lightning.models.TorchvisionModel`,
            ``classifier.1`` in MobileNetV2.
        layer_input: for explicit layer paths, tap each module's input instead of its output
            (e.g. ``student_layer: fc, layer_input: true`` is the default embedding).
        ce_weight: weight of the cross-entropy on the labels (default 1).
        kd_weight: weight of the Hinton soft-target term (default 0: RKD + CE, as in Park et al.'s
            classification experiments).
        temperature: temperature of that term (default 4).
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule`.
    """

    requires_teacher = True

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 student_layer: str | None = None, teacher_layer: str | None = None,
                 layer_input: bool = False, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 temperature: float = 4.0, **kwargs) -> None:
        check_weights("RelationKD", distance_weight=distance_weight, angle_weight=angle_weight,
                      ce_weight=ce_weight, kd_weight=kd_weight)
        if distance_weight == 0 and angle_weight == 0:
            raise KDConfigError("RelationKD: distance_weight and angle_weight are both 0, so nothing "
                                "relational is distilled; set 25 and 50 (Park et al.), or use "
                                "ResponseKD / Supervised for a logit-only or label-only baseline.")
        check_temperature("RelationKD", temperature)
        super().__init__(**kwargs)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.ce_weight, self.kd_weight, self.temperature = ce_weight, kd_weight, temperature
        self.student_taps = FeatureTaps(self.student, *_embedding_layer(
            self.student, "student", student_layer, layer_input))
        self.teacher_taps = self.tap_teacher(*_embedding_layer(
            self.teacher, "teacher", teacher_layer, layer_input))

    def compute_losses(self, x, y, index):
        logits = self.student(x)
        (s_emb,) = self.student_taps.pop()
        t_logits, (t_emb,) = self.teacher_forward(x, index)
        rkd, dist, angle = rkd_loss(s_emb, t_emb, self.distance_weight, self.angle_weight)
        terms = {"loss_ce": self.ce_weight * labelled_cross_entropy(logits, y), "loss_rkd": rkd}
        if self.kd_weight > 0:
            terms["loss_kd"] = self.kd_weight * kd_loss(logits, t_logits, self.temperature)
        return Losses(logits, terms, {"loss_rkd_d": dist, "loss_rkd_a": angle})


def _embedding_layer(net: nn.Module, role: str, layer: str | None,
                     layer_input: bool) -> tuple[list[str], bool]:
    """``(layers, pre_activation)`` for the taps: ``layer`` (its output, or its input with
    ``layer_input``); by default the input of the last ``nn.Linear`` (the classifier), which is
    the penultimate embedding."""
    if layer is not None:
        return [layer], layer_input
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KDConfigError(
            f"RelationKD: the {role} ({type(net).__name__}) has no nn.Linear classifier whose input "
            f"could serve as its penultimate embedding; set model.init_args.{role}_layer to the "
            f"module path of its embedding (its output is tapped; set model.init_args.layer_input "
            f"true to tap the module's input instead).")
    return [linears[-1]], True
