"""Neuron selectivity transfer: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron
Selectivity Transfer", arXiv:1707.01219, 2017."""

from __future__ import annotations

from kd_lightning import KDConfigError
from kd_lightning.losses.nst import nst_loss
from kd_lightning.methods.feature import FeatureDistillation, Shape, describe, is_map, paired_layers


class NeuronSelectivityTransfer(FeatureDistillation):
    r"""Neuron selectivity transfer (Huang & Wang, 2017), single stage.

    .. math::
        L = w_{ce}\, CE(y, z_s) + \lambda \sum_l \mathcal{L}_{MMD^2}\big(F_T^{(l)}, F_S^{(l)}\big)
            \;(+\, w_{kd}\, T^2\, \mathrm{KL}(\sigma(z_t/T) \| \sigma(z_s/T)))

    Each channel of a tapped feature map, L2-normalised over the spatial positions, is one sample
    of where the network "looks"; the squared maximum mean discrepancy with the polynomial kernel
    :math:`k(x, y) = (x^\top y + c)^d` matches the distribution of the student's channels to the
    teacher's (:func:`~kd_lightning.losses.nst_loss`). Channel counts may differ (no connector
    is needed); maps of different spatial size are average-pooled to the smaller one.
    :math:`\lambda` is ``transfer_weight``; it multiplies the squared MMD directly, as in the
    CRD benchmark (the paper writes :math:`\lambda / 2`).

    Layers: the outputs of the residual stages (``layer1``, ``layer2``, ``layer3`` of the CIFAR
    ResNets and WRNs; ``relu1``, ``relu2``, ``relu3`` of ConvNet1D), i.e. every feature map after
    the stem, as in the CRD benchmark's NST on CIFAR-100.

    Logged terms (weighted): ``loss``, ``loss_nst``, ``loss_ce`` (and ``loss_kd``).

    Args:
        student_layers: student module paths of feature maps.
        teacher_layers: the matching teacher paths; default: the same as ``student_layers``.
        transfer_weight: :math:`\lambda` (default 50, the CRD benchmark's CIFAR-100 value).
        kernel_degree: ``d`` of the polynomial kernel, an integer >= 1 (default 2, the paper's
            best kernel).
        kernel_offset: ``c`` of the polynomial kernel, >= 0 (default 0).
        **kwargs: ``ce_weight`` (1), ``kd_weight`` (0: CE + NST, as in the CRD benchmark; the
            paper also reports NST + KD), ``temperature``, ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, student_layers: list[str], teacher_layers: list[str] | None = None,
                 transfer_weight: float = 50.0, kernel_degree: int = 2, kernel_offset: float = 0.0,
                 **kwargs) -> None:
        if isinstance(kernel_degree, bool) or not isinstance(kernel_degree, int) or kernel_degree < 1:
            raise KDConfigError(f"NeuronSelectivityTransfer: kernel_degree must be an integer >= 1, "
                                f"got {kernel_degree!r} (the paper uses d = 2).")
        if not kernel_offset >= 0:
            raise KDConfigError(f"NeuronSelectivityTransfer: kernel_offset must be >= 0, got "
                                f"{kernel_offset!r} (the paper uses c = 0).")
        student_layers, teacher_layers = paired_layers("NeuronSelectivityTransfer", student_layers,
                                                       teacher_layers)
        super().__init__(transfer_weight=transfer_weight, **kwargs)
        self.kernel_degree, self.kernel_offset = kernel_degree, kernel_offset
        self.init_features(student_layers, teacher_layers)

    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        for s_path, t_path, s, t in zip(self.student_layers, self.teacher_layers, student_shapes,
                                        teacher_shapes):
            desc = (f"student layer '{s_path}' gives {describe(s)}, teacher layer '{t_path}' "
                    f"gives {describe(t)}")
            if not (is_map(s) and is_map(t)):
                raise KDConfigError(
                    f"NeuronSelectivityTransfer: {desc}; NST compares the spatial activation "
                    f"patterns of channels, so it needs feature maps [B, C, L] or [B, C, H, W] in "
                    f"both networks. Tap convolutional layers or blocks (e.g. relu1/relu2/relu3 of "
                    f"ConvNet1D, layer1/layer2/layer3 of a CIFAR ResNet).")
            if len(s) != len(t):
                raise KDConfigError(f"NeuronSelectivityTransfer: {desc}; both must be 1D maps or "
                                    f"both 2D maps.")

    def transfer_loss(self, feats, t_feats):
        return "loss_nst", nst_loss(feats, t_feats, self.kernel_degree, self.kernel_offset)
