"""Variational information distillation: Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information
Distillation for Knowledge Transfer", CVPR 2019."""

from __future__ import annotations

from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.losses.vid import VIDRegressor, vid_loss
from kd_lightning.methods.feature import FeatureDistillation, Shape, describe, paired_layers


class VID(FeatureDistillation):
    r"""Variational information distillation (Ahn et al., 2019), single stage.

    For each layer pair ``j`` a Gaussian :math:`q(t_j \mid s_j) = \mathcal{N}(\mu_j(s_j),
    \mathrm{diag}\,\sigma_j^2)` is learnt (:class:`~kd_lightning.losses.VIDRegressor`: three 1x1
    convolutions for the mean, one variance per teacher channel), and the student maximises the
    variational lower bound on the mutual information by minimising the negative log-likelihood
    of the teacher's feature (:func:`~kd_lightning.losses.vid_loss`):

    .. math:: L = w_{ce}\, CE + \beta \sum_j \mathrm{mean}_{b,c,p}\ \tfrac12\Big(\log\sigma_{j,c}^2
              + \frac{(t_{j,b,c,p} - \mu_{j,b,c,p}(s_j))^2}{\sigma_{j,c}^2}\Big)

    The regressors are submodules of the method, so the optimizer trains them with the student
    (the paper maximises the bound jointly over the student and :math:`q`), and checkpoints store
    them. :math:`\beta` is ``transfer_weight``.

    Layers: the outputs of the residual stages (``layer1``, ``layer2``, ``layer3`` of CIFAR
    ResNets and WRNs, ``relu1``/``relu2``/``relu3`` of ConvNet1D), as in the CRD benchmark's
    VID (every stage output except the stem and the pooled feature). A student map larger than
    the teacher's is average-pooled to the teacher's size by the loss. Pairs are map-with-map of
    the same kind (1D or 2D) or vector-with-vector.

    Logged terms (weighted): ``loss``, ``loss_ce`` (and ``loss_kd``), ``loss_vid``.

    Args:
        student_layers: student module paths, shallow to deep.
        teacher_layers: the matching teacher paths; default: the same as ``student_layers``.
        transfer_weight: :math:`\beta`, the weight of the summed VID terms (CRD benchmark on
            CIFAR-100: 1).
        mid_channels: width of the regressors' hidden 1x1 layers; default the teacher layer's
            channels (the CRD benchmark's choice).
        init_variance: :math:`\sigma^2` at initialisation (5.0, the authors' code).
        ce_weight: weight of the cross-entropy (default 1, CRD benchmark).
        kd_weight: weight of Hinton KD (default 0: VID + CE, as in the CRD benchmark).
        **kwargs: ``temperature``, ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, student_layers: list[str], teacher_layers: list[str] | None = None,
                 transfer_weight: float = 1.0, mid_channels: int | None = None,
                 init_variance: float = 5.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 **kwargs) -> None:
        student_layers, teacher_layers = paired_layers("VID", student_layers, teacher_layers)
        if mid_channels is not None and int(mid_channels) < 1:
            raise KDConfigError(f"VID: mid_channels must be a positive integer (or null for the "
                                f"teacher layer's channels), got {mid_channels}.")
        if not init_variance > 1e-5:
            raise KDConfigError(f"VID: init_variance must be > 1e-5 (the variance floor), got "
                                f"{init_variance}; the authors use 5.0.")
        super().__init__(transfer_weight=transfer_weight, ce_weight=ce_weight, kd_weight=kd_weight,
                         **kwargs)
        self.mid_channels, self.init_variance = mid_channels, float(init_variance)
        self.regressors = nn.ModuleList()
        self.init_features(student_layers, teacher_layers)

    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        for s_path, t_path, s, t in zip(self.student_layers, self.teacher_layers, student_shapes,
                                        teacher_shapes):
            if len(s) != len(t) or len(s) not in (1, 2, 3):
                raise KDConfigError(
                    f"VID: student layer '{s_path}' gives {describe(s)} but teacher layer "
                    f"'{t_path}' gives {describe(t)}; the regressor maps a student feature to the "
                    f"teacher's channel by channel (1x1 convolutions), so pair maps of the same "
                    f"kind ([B, C, L] with [B, C, L], [B, C, H, W] with [B, C, H, W]) or vectors "
                    f"with vectors, e.g. relu1/relu2/relu3 of ConvNet1D or layer1/layer2/layer3 "
                    f"of CIFAR ResNets.")
            self.regressors.append(VIDRegressor(s[0], t[0], self.mid_channels, dims=len(s) - 1,
                                                init_variance=self.init_variance))

    def transfer_loss(self, feats, t_feats):
        return "loss_vid", sum(vid_loss(*reg(f), t) for reg, f, t in zip(self.regressors, feats, t_feats))
