"""Attention transfer: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017."""

from __future__ import annotations

from kd_lightning import KDConfigError
from kd_lightning.losses.feature import at_loss, attention_map
from kd_lightning.methods.feature import FeatureDistillation, Shape, describe, is_map, paired_layers


class AttentionTransfer(FeatureDistillation):
    r"""Activation-based attention transfer (Zagoruyko & Komodakis, 2017), single stage.

    :math:`L = L_{task} + \beta \sum_j \mathrm{mean}\big((Q_S^j/\|Q_S^j\| - Q_T^j/\|Q_T^j\|)^2\big)`
    with :math:`Q^j` the channel mean of the squared activations of layer pair ``j``, flattened
    per example (:func:`~kd_lightning.losses.at_loss`). Channel counts may differ between student
    and teacher (no connector is needed); maps of different spatial size are pooled to the
    smaller. The task loss is cross-entropy (default) or adds Hinton KD with ``kd_weight > 0``
    (the paper's AT+KD). :math:`\beta` is ``transfer_weight``.

    Logged terms (weighted): ``loss``, ``loss_at``, ``loss_ce`` (and ``loss_kd``).

    Args:
        student_layers: student module paths of feature maps, e.g. ``["layer1", "layer2",
            "layer3"]`` for CIFAR ResNets (the group outputs the paper uses).
        teacher_layers: the matching teacher paths; default: the same as ``student_layers``.
        transfer_weight: :math:`\beta`, the weight of the attention term (default 1000, as in the
            paper's code).
        **kwargs: ``ce_weight`` (1), ``kd_weight`` (0), ``temperature``, ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, student_layers: list[str], teacher_layers: list[str] | None = None,
                 transfer_weight: float = 1000.0, **kwargs) -> None:
        student_layers, teacher_layers = paired_layers("AttentionTransfer", student_layers, teacher_layers)
        super().__init__(transfer_weight=transfer_weight, **kwargs)
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

    def transfer_loss(self, feats, t_feats):
        return "loss_at", at_loss(feats, t_feats)

    def inspection_figures(self, batch):
        """Attention maps of the tapped layers, teacher vs student, for the shown examples."""
        from kd_lightning.training.figures import attention_maps_figure

        x, y = batch[0], batch[1]
        _, feats = self.student_forward(x)
        _, t_feats = self.teacher_forward(x)
        names = [s if s == t else f"{s} / {t}" for s, t in zip(self.student_layers, self.teacher_layers)]
        return {"attention_maps": attention_maps_figure([attention_map(f) for f in t_feats],
                                                        [attention_map(f) for f in feats], names, y)}
