"""Knowledge review: Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021."""

from __future__ import annotations

from collections.abc import Sequence

from kd_lightning import KDConfigError
from kd_lightning.losses.decoupled import dkd_warmup_weight
from kd_lightning.losses.review import build_abfs, hcl_loss, review_chain
from kd_lightning.methods.base import Losses
from kd_lightning.methods.feature import FeatureDistillation, Shape, describe, is_map, paired_layers
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.training.epochs import check_epochs, resolve_epochs


def _flags(name: str, value: bool | Sequence[bool], n: int) -> list[bool]:
    flags = [bool(value)] * n if isinstance(value, bool) else [bool(v) for v in value]
    if len(flags) != n:
        raise KDConfigError(f"ReviewKD: {name} must be one bool or one per layer ({n}), got {value}.")
    return flags


class ReviewKD(FeatureDistillation):
    r"""Knowledge review (Chen et al., 2021), single stage.

    The student's levels :math:`s_0, \dots, s_{n-1}` (shallow to deep) are fused from the
    deepest to the shallowest by attention-based fusion modules
    (:class:`~kd_lightning.losses.ABF`, one per level, trained with the student;
    :func:`~kd_lightning.losses.review_chain`): level :math:`i`'s output :math:`y_i` combines
    :math:`s_i` with the fused features of all deeper levels, and is compared with the teacher's
    level :math:`i` by the hierarchical context loss (:func:`~kd_lightning.losses.hcl_loss`: MSE
    at full resolution plus pooled 4x4, 2x2, 1x1 pyramid levels):

    .. math:: L = w_{ce}\, CE + \lambda \cdot \min\Big(1, \frac{e + 1}{E_w}\Big)
              \sum_{i} \mathrm{HCL}(y_i, t_i)

    with :math:`\lambda` = ``transfer_weight`` and the linear warm-up over the first
    :math:`E_w` = ``warmup_epochs`` epochs of the authors' code (epochs counted from 1 there,
    :math:`e` = ``current_epoch`` here, so the first epoch has weight :math:`1/E_w`; it is
    derived from ``current_epoch``, so resuming keeps it).

    Layers (CIFAR-100, the authors' code): the student's stage outputs (post-ReLU: ``layer1``,
    ``layer2``, ``layer3`` of CIFAR ResNets) plus its pooled embedding as the deepest level (the
    *input* of ``fc``, a ``1 x 1`` map: set ``student_pre_activation`` true for that entry); the
    teacher's *pre-ReLU* stage outputs (the inputs of ``layerK.<last>.relu``) plus its pooled
    embedding (input of ``fc``). For WRNs (pre-activation blocks) the student's stage outputs are
    ``layer1``, ``layer2``, ``layer3`` and the teacher's pre-ReLU ones the inputs of
    ``layer2.0.relu1``, ``layer3.0.relu1``, ``relu`` (the batch-normalised stage outputs).
    ConvNet1D has no pooling (its ``fc`` input is ``relu3`` flattened), so the MNIST-1D
    config uses ``relu1``/``relu2``/``relu3`` only. The ABFs have
    ``mid = min(512, C_deepest)`` channels; each output is resized to its teacher level's size.

    Logged terms: ``loss``, ``loss_ce`` (and ``loss_kd``), ``loss_review`` (weighted, warm-up
    included), ``loss_hcl`` (unweighted).

    Args:
        student_layers: student module paths, shallow to deep.
        teacher_layers: the matching teacher paths; default: the same as ``student_layers``.
        student_pre_activation: tap the student modules' inputs instead of their outputs: one bool
            or one per layer (default false; true for an ``fc`` entry, the pooled embedding).
        teacher_pre_activation: the same for the teacher (default true: pre-ReLU features, tapping
            the ReLUs and ``fc``).
        transfer_weight: :math:`\lambda` (the authors: 5.0 for resnet32x4 -> resnet8x4 and the WRN
            pairs, 0.6 for resnet56 -> resnet20, 1.0 for resnet110 -> resnet32; default 1).
        warmup_epochs: :math:`E_w`: epochs (int, 20 in the paper's CIFAR code) or a fraction of
            ``max_epochs`` (float in [0, 1)); 0 turns the warm-up off.
        mid_channels: width of the fused features; default ``min(512, C_deepest)``.
        ce_weight: weight of the cross-entropy (default 1).
        kd_weight: weight of Hinton KD (default 0, as in the paper).
        **kwargs: ``temperature``, ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, student_layers: list[str], teacher_layers: list[str] | None = None,
                 student_pre_activation: bool | list[bool] = False,
                 teacher_pre_activation: bool | list[bool] = True, transfer_weight: float = 1.0,
                 warmup_epochs: int | float = 20, mid_channels: int | None = None,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, **kwargs) -> None:
        student_layers, teacher_layers = paired_layers("ReviewKD", student_layers, teacher_layers)
        n = len(student_layers)
        s_flags = _flags("student_pre_activation", student_pre_activation, n)
        t_flags = _flags("teacher_pre_activation", teacher_pre_activation, n)
        check_epochs(warmup_epochs, "warmup_epochs", "ReviewKD")
        if mid_channels is not None and int(mid_channels) < 1:
            raise KDConfigError(f"ReviewKD: mid_channels must be a positive integer (or null for "
                                f"min(512, C_deepest)), got {mid_channels}.")
        super().__init__(transfer_weight=transfer_weight, ce_weight=ce_weight, kd_weight=kd_weight,
                         **kwargs)
        self.warmup_epochs, self.mid_channels = warmup_epochs, mid_channels
        self.abfs = None
        self.out_sizes: list[tuple[int, ...] | None] = []
        self.init_features(student_layers, teacher_layers, s_flags, t_flags)

    def init_features(self, student_layers, teacher_layers, student_pre_activation=False,
                      teacher_pre_activation=None) -> None:
        """As :meth:`FeatureDistillation.init_features`, with the teacher's taps set apart
        (pre-ReLU teacher features next to post-ReLU student ones)."""
        if teacher_pre_activation is None:
            teacher_pre_activation = student_pre_activation
        self.student_layers, self.teacher_layers = list(student_layers), list(teacher_layers)
        self.pre_activation = student_pre_activation  # the student's taps (student_forward)
        FeatureTaps(self.student, self.student_layers, student_pre_activation).remove()  # paths exist?
        self._teacher_feature_taps = self.tap_teacher(self.teacher_layers, teacher_pre_activation)
        if self.input_shape is not None:
            self._build_features(self.input_shape)

    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        dims = {len(s) - 1 for s in student_shapes + teacher_shapes if is_map(s)}
        pairs = list(zip(self.student_layers, self.teacher_layers, student_shapes, teacher_shapes))
        desc = "; ".join(f"student '{sp}' {describe(s)}, teacher '{tp}' {describe(t)}"
                         for sp, tp, s, t in pairs)
        if len(dims) != 1 or any(len(s) not in (1, 2, 3) for s in student_shapes + teacher_shapes):
            raise KDConfigError(
                f"ReviewKD fuses feature maps of one kind (all [B, C, L] or all [B, C, H, W], plus "
                f"optionally pooled [B, C] vectors as 1x1 maps), got: {desc}. Tap the stage outputs "
                f"(relu1/relu2/relu3 of ConvNet1D; layer1/layer2/layer3 and the input of fc of a "
                f"CIFAR ResNet).")
        (d,) = dims
        self.out_sizes = [tuple(t[1:]) if is_map(t) else None for t in teacher_shapes]
        self.abfs = build_abfs([s[0] for s in student_shapes], [t[0] for t in teacher_shapes],
                               self.mid_channels, dims=d)

    def warmup_factor(self) -> float:
        """:math:`\\min(1, (e + 1) / E_w)` for the current epoch ``e`` (1 without warm-up)."""
        epochs = resolve_epochs(self.warmup_epochs, getattr(self.trainer_or_none, "max_epochs", None),
                                "warmup_epochs", "ReviewKD", exact=True)
        if epochs == 0:
            return 1.0
        return dkd_warmup_weight(self.current_epoch, epochs)

    def transfer_loss(self, feats, t_feats):
        return "loss_hcl", hcl_loss(review_chain(feats, self.abfs, self.out_sizes), t_feats)

    def compute_losses(self, x, y, index):
        logits, feats = self.student_forward(x)
        t_logits, t_feats = self.teacher_forward(x, index)
        _, hcl = self.transfer_loss(feats, t_feats)
        terms = self.task_terms(logits, y, x, index, t_logits)
        terms["loss_review"] = self.transfer_weight * self.warmup_factor() * hcl
        return Losses(logits, terms, {"loss_hcl": hcl})
