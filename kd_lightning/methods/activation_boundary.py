"""Activation boundaries: Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons", AAAI 2019."""

from __future__ import annotations

from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.losses.feature import ab_loss
from kd_lightning.methods.feature import Shape, TwoStageFeatureDistillation, paired_layers


class ActivationBoundary(TwoStageFeatureDistillation):
    r"""Activation-boundary transfer (Heo et al., 2019).

    The student's pre-ReLU response of each tapped layer goes through a connector (1x1 conv + BN
    for maps, linear for vectors) and is pushed to the teacher's side of every neuron's activation
    boundary with the margin loss :func:`~kd_lightning.losses.ab_loss`:
    :math:`(s+m)^2 [s > -m, t \le 0] + (s-m)^2 [s \le m, t > 0]`, summed over neurons, averaged
    over the batch, weighted per layer: :math:`L_{AB} = \sum_l w_l\, L_{AB}^{(l)}`.
    Stage 1: :math:`L_{AB}` only (boundary transfer initialises the student). Stage 2:
    cross-entropy (the paper; ``kd_weight > 0`` adds KD). With ``stage1_epochs=0``: task +
    ``transfer_weight`` x AB.

    Pre-ReLU responses come from forward *pre*-hooks: with ``pre_activation=True`` (default) the
    tapped modules should be the ReLUs themselves (``relu1``/``relu2``/``relu3`` of ConvNet1D,
    ``layerK.i.relu`` of a CIFAR ResNet block: its input is ``bn2(...) + shortcut``). With
    ``pre_activation=False`` the tapped modules' outputs are used (e.g. ``conv2`` of ConvNet1D).

    Logged terms (weighted): ``loss``, ``loss_ab`` (stage 1 / single stage), ``loss_ce`` (and ``loss_kd``)
    in stage 2, and ``stage``.

    Args:
        student_layers: student module paths, e.g. ``["relu1", "relu2", "relu3"]``.
        teacher_layers: the matching teacher paths; default: the same as ``student_layers``.
        margin: :math:`m > 0` (default 1, as in the paper).
        layer_weights: :math:`w_l` per layer; default 1 each. (The CRD benchmark uses
            ``2^(l-n+1) * 3/1000`` with SGD, see ``configs/cifar100/ab_*.yaml``.)
        pre_activation: tap the modules' inputs (pre-hook) instead of their outputs (default True).
        stage1_epochs: length of the transfer stage: epochs (int) or a fraction of ``max_epochs``
            (float in [0, 1)); 0 = single stage (default 0.2).
        **kwargs: ``ce_weight`` (1), ``kd_weight`` (0), ``temperature``, ``transfer_weight`` (1),
            ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, student_layers: list[str], teacher_layers: list[str] | None = None,
                 margin: float = 1.0, layer_weights: list[float] | None = None,
                 pre_activation: bool = True, stage1_epochs: int | float = 0.2, **kwargs) -> None:
        student_layers, teacher_layers = paired_layers("ActivationBoundary", student_layers, teacher_layers)
        if margin <= 0:
            raise KDConfigError(f"margin must be > 0, got {margin} (default 1, as in Heo et al.).")
        if layer_weights is not None and (len(layer_weights) != len(student_layers)
                                          or any(w < 0 for w in layer_weights)):
            raise KDConfigError(f"layer_weights must give one weight >= 0 per layer "
                                f"({len(student_layers)}), got {layer_weights}.")
        super().__init__(stage1_epochs=stage1_epochs, **kwargs)
        self.margin = margin
        self.layer_weights = list(layer_weights) if layer_weights is not None else [1.0] * len(student_layers)
        self.connectors = nn.ModuleList()
        self.init_features(student_layers, teacher_layers, pre_activation=pre_activation)

    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        self.build_connectors(student_shapes, teacher_shapes, "ActivationBoundary")

    def transfer_loss(self, feats, t_feats):
        return "loss_ab", sum(w * ab_loss(c(f), t, self.margin) for w, c, f, t in
                              zip(self.layer_weights, self.connectors, feats, t_feats))
