"""Similarity-preserving KD: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019."""

from __future__ import annotations

from kd_lightning.losses.similarity import sp_loss
from kd_lightning.methods.feature import FeatureDistillation, Shape, paired_layers


class SimilarityPreserving(FeatureDistillation):
    r"""Similarity-preserving distillation (Tung & Mori, ICCV 2019), single stage.

    .. math::
        L = w_{ce}\, CE(y, z_s) + \gamma \sum_{(l, l')} \frac{1}{b^2}
            \big\| G_T^{(l)} - G_S^{(l')} \big\|_F^2
            \;(+\, w_{kd}\, T^2\, \mathrm{KL}(\sigma(z_t/T) \| \sigma(z_s/T)))

    with :math:`G` the ``b x b`` matrix of pairwise similarities of the batch's activations at a
    tapped layer, each row L2-normalised (:func:`~kd_lightning.losses.sp_loss`), and ``b`` the
    batch size. The student matches which examples the teacher finds alike, not the activations
    themselves, so the tapped layers may have any widths and spatial sizes and no connector is
    needed. The similarities are those within each process's batch (under DDP, within each
    rank's share). :math:`\gamma` is ``transfer_weight``.

    Layers: the output of the last residual stage of each network (``layer3`` of the CIFAR
    ResNets and WRNs, ``relu3`` of ConvNet1D). The paper applies the loss to the activation map
    at the end of the last group of residual blocks, and the CRD benchmark (Tian et al., ICLR
    2020), whose CIFAR-100 numbers are the usual reference, does the same (its second-to-last
    feature, the input of the global pooling).

    Logged terms (weighted): ``loss``, ``loss_sp``, ``loss_ce`` (and ``loss_kd``).

    Args:
        student_layers: student module paths, e.g. ``["layer3"]``.
        teacher_layers: the matching teacher paths; default: the same as ``student_layers``.
        transfer_weight: :math:`\gamma` (default 3000: the paper's value on CIFAR-10, which the
            CRD benchmark also uses on CIFAR-100).
        **kwargs: ``ce_weight`` (1), ``kd_weight`` (0: CE + SP as in the paper and the CRD
            benchmark), ``temperature``, ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, student_layers: list[str], teacher_layers: list[str] | None = None,
                 transfer_weight: float = 3000.0, **kwargs) -> None:
        student_layers, teacher_layers = paired_layers("SimilarityPreserving", student_layers,
                                                       teacher_layers)
        super().__init__(transfer_weight=transfer_weight, **kwargs)
        self.init_features(student_layers, teacher_layers)

    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        """Any per-example shapes work: the similarity matrices are ``b x b`` whatever the layer."""

    def transfer_loss(self, feats, t_feats):
        return "loss_sp", sp_loss(feats, t_feats)
