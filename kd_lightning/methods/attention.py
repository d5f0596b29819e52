"""Attention transfer: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017."""

from __future__ import annotations

from kd_lightning import KDConfigError
from kd_lightning.losses.feature import at_loss
from kd_lightning.methods.feature import FeatureDistillation, Shape, describe, is_map, paired_layers


class AttentionTransfer(FeatureDistillation):
    r"""Activation-based attention transfer (Zagoruyko & Komodakis, 2017), single stage.

    :math:`L = L_{task} + \beta \sum_j \mathrm{mean}\big((Q_S^j/\|Q_S^j\| - Q_T^j/\|Q_T^j\|)^2\big)`
    with :math:`Q^j` the channel mean of the squared activations of layer pair ``j``, flattened
    per example (:func:`~kd_lightning.losses.at_loss`). Channel counts may differ between student
    and teacher (no connector is needed); maps of different spatial size are pooled to the
    smaller. The task loss is cross-entropy (``task_loss="ce"``, default) or Hinton KD
    (``"kd"``, the paper's AT+KD).

    Logged terms: ``loss``, ``loss_at`` (unweighted), ``loss_ce`` (and ``loss_kd``).

    Args:
        student_layers: student module paths of feature maps, e.g. ``["layer1", "layer2",
            "layer3"]`` for CIFAR ResNets (the group outputs the paper uses).
        teacher_layers: the matching teacher paths; default: the same as ``student_layers``.
        beta: weight of the attention term (default 1000, as in the paper's code).
        task_loss: ``"ce"`` (default) or ``"kd"``.
        **kwargs: ``temperature``, ``alpha``, ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, student_layers: list[str], teacher_layers: list[str] | None = None,
                 beta: float = 1000.0, task_loss: str = "ce", **kwargs) -> None:
        student_layers, teacher_layers = paired_layers("AttentionTransfer", student_layers, teacher_layers)
        if beta < 0:
            raise KDConfigError(f"beta must be >= 0, got {beta} (default 1000).")
        super().__init__(task_loss=task_loss, **kwargs)
        self.beta = beta
        self.init_features(student_layers, teacher_layers)

    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        for s_path, t_path, s, t in zip(self.student_layers, self.teacher_layers, student_shapes,
                                        teacher_shapes):
            desc = f"student layer '{s_path}' gives {describe(s)}, teacher layer '{t_path}' gives {describe(t)}"
            if not (is_map(s) and is_map(t)):
                raise KDConfigError(
                    f"AttentionTransfer: {desc}; attention maps need feature maps [B, C, L] or "
                    f"[B, C, H, W] in both networks. Tap convolutional layers or blocks (e.g. "
                    f"relu1/relu2/relu3 of ConvNet1D, layer1/layer2/layer3 of a CIFAR ResNet).")
            if len(s) != len(t):
                raise KDConfigError(f"AttentionTransfer: {desc}; both must be 1D maps or both 2D maps.")

    def training_step(self, batch, batch_idx: int):
        x, y, idx = batch
        logits, feats = self.student_forward(x)
        t_logits, t_feats = self.teacher_forward(x, idx)
        at = at_loss(feats, t_feats)
        task, terms = self.task_terms(logits, y, x, idx, t_logits)
        loss = task + self.beta * at
        self.log_terms(logits, y, loss=loss, **terms, loss_at=at)
        return loss
