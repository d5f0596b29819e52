"""FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (arXiv:1412.6550)."""

from __future__ import annotations

from torch import nn

from kd_lightning.losses.feature import hint_loss
from kd_lightning.methods.feature import Shape, TwoStageFeatureDistillation, paired_layers


class FitNet(TwoStageFeatureDistillation):
    r"""Hint-based training (Romero et al., 2015).

    Stage 1 (hint training): the student's guided layer ``v_g`` is regressed onto the teacher's
    hint layer ``u_h`` through a learnable regressor ``r`` (a connector: 1x1 conv + BN for maps,
    linear for vectors), :math:`L = L_{HT} = \mathrm{MSE}(r(v_g(x)), u_h(x))` summed over the
    layer pairs. Stage 2: the task loss :math:`w_{ce}\,CE + w_{kd}\,KD` (by default KD as in the
    paper's stage 2: ``ce_weight`` 0.1, ``kd_weight`` 0.9; ``kd_weight: 0`` and ``ce_weight: 1``
    for cross-entropy). With ``stage1_epochs=0`` (single stage, as in the CRD benchmark):
    :math:`L = L_{task} + \beta\, L_{HT}` with :math:`\beta` = ``transfer_weight``.

    Logged terms (weighted): ``loss``, ``loss_hint`` (stage 1 / single stage), ``loss_ce`` and
    ``loss_kd`` (stage 2 / single stage), and ``stage``.

    Args:
        student_layers: module paths of the guided layer(s) in the student, e.g. ``["relu2"]``.
        teacher_layers: module paths of the hint layer(s) in the teacher, one per student layer;
            default: the same paths as ``student_layers``.
        transfer_weight: :math:`\beta`, the weight of the hint loss in a single-stage run
            (default 100, as in the CRD benchmark; stage 1 of a two-stage run minimises the hint
            loss alone).
        stage1_epochs: length of the hint stage: epochs (int) or a fraction of ``max_epochs``
            (float in [0, 1)); 0 = single stage (default 0.2).
        ce_weight, kd_weight: weights of the task loss (defaults 0.1 and 0.9: KD).
        **kwargs: ``temperature`` (4), ``input_shape``, and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments (student, teacher,
            teacher_checkpoint, optimizer, ...).
    """

    def __init__(self, student_layers: list[str], teacher_layers: list[str] | None = None,
                 transfer_weight: float = 100.0, stage1_epochs: int | float = 0.2,
                 ce_weight: float = 0.1, kd_weight: float = 0.9, **kwargs) -> None:
        student_layers, teacher_layers = paired_layers("FitNet", student_layers, teacher_layers)
        super().__init__(stage1_epochs=stage1_epochs, transfer_weight=transfer_weight,
                         ce_weight=ce_weight, kd_weight=kd_weight, **kwargs)
        self.connectors = nn.ModuleList()
        self.init_features(student_layers, teacher_layers)

    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        self.build_connectors(student_shapes, teacher_shapes, "FitNet")

    def transfer_loss(self, feats, t_feats):
        return "loss_hint", sum(hint_loss(r(f), t) for r, f, t in zip(self.connectors, feats, t_feats))
