"""Overhaul of feature distillation: Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of
Feature Distillation", ICCV 2019."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kd_lightning import KDConfigError
from kd_lightning.losses.ofd import ofd_loss, ofd_margin, ofd_margin_from_bn
from kd_lightning.methods.feature import FeatureDistillation, Shape, describe, paired_layers
from kd_lightning.models.connectors import ConvConnector
from kd_lightning.models.taps import FeatureTaps, resolve_module
from kd_lightning.training.lightning_compat import BATCH_NORM_BASE

MARGIN_SOURCES = ("bn", "data")

#: autograd nodes a batch norm's output may pass on its way to the tapped ReLU input (the
#: residual addition of a ResNet block, and copies/views that do not change values)
_PASS_THROUGH = ("AddBackward", "CloneBackward", "AliasBackward", "ViewBackward", "ReshapeAliasBackward")


class OFD(FeatureDistillation):
    r"""Overhaul of feature distillation (Heo et al., 2019), single stage.

    At the end of each stage the teacher's *pre-ReLU* feature :math:`t_i` is the target, raised
    to a per-channel margin :math:`m_i` (margin ReLU :math:`\max(t, m)`: the expected value of
    the channel's negative responses, :func:`~kd_lightning.losses.ofd_margin`). The student's
    pre-ReLU feature goes through a connector :math:`r_i` (1x1 convolution + batch norm,
    :class:`~kd_lightning.models.ConvConnector`, trained with the student) and is compared by the
    partial L2 distance, which ignores a student response already below a non-positive target
    (:func:`~kd_lightning.losses.ofd_loss`):

    .. math:: L = w_{ce}\, CE + \alpha \sum_{i=0}^{n-1} \frac{1}{2^{n-1-i}}\,
              \frac1B \sum_{b,c,p} d_p\big(\max(t_i, m_i),\ r_i(s_i)\big)

    with :math:`\alpha` = ``transfer_weight`` (:math:`10^{-3}` on CIFAR-100, the paper).

    **Margins.** The paper models channel :math:`c`'s pre-ReLU response as
    :math:`\mathcal{N}(\beta_c, \gamma_c^2)`, with :math:`\gamma, \beta` the affine parameters of
    the teacher's batch norm right before the ReLU (``margin_source: bn``). That batch norm is
    found by following the tapped tensor back through the autograd graph of one forward pass
    (through residual additions only; e.g. ``layerK.i.bn2`` for the ReLU input of a CIFAR ResNet
    block, ``layerK.0.bn1`` for a WRN stage's pre-activation), or given as
    ``teacher_bn_layers``. A teacher without batch norms (ConvNet1D) uses
    ``margin_source: data``: :math:`\beta_c, \gamma_c` are then the mean and standard deviation
    of the teacher's pre-ReLU responses over the training examples (the quantities the batch
    norm's parameters stand for), measured once at the start of training. The margins are
    persistent buffers (saved in checkpoints).

    Layers: pre-ReLU outputs of the stages, tapped as the *inputs* of the ReLUs
    (``pre_activation``): ``relu1``/``relu2``/``relu3`` of ConvNet1D; ``layerK.<last>.relu`` of a
    CIFAR ResNet (input ``bn2(...) + shortcut``); ``layer2.0.relu1``, ``layer3.0.relu1``,
    ``relu`` of a WRN (its pre-activation blocks put the BN+ReLU of a stage's output at the start
    of the next stage). Student and teacher maps must be of the same kind; a larger map is
    average-pooled to the smaller one.

    Logged terms (weighted): ``loss``, ``loss_ce`` (and ``loss_kd``), ``loss_ofd``.

    Args:
        student_layers: student module paths, shallow to deep.
        teacher_layers: the matching teacher paths; default: the same as ``student_layers``.
        transfer_weight: :math:`\alpha` (default :math:`10^{-3}`, the paper's CIFAR-100 setting;
            ImageNet :math:`10^{-4}`).
        margin_source: ``"bn"`` (the paper) or ``"data"`` (see above).
        teacher_bn_layers: with ``margin_source: bn``, the teacher's batch norm before each
            tapped ReLU; default: found from the graph.
        stage_weights: per-layer weights; default :math:`1/2^{n-1-i}` (the authors' code).
        pre_activation: tap the modules' inputs (default true: tap the ReLUs) instead of their
            outputs (e.g. a batch norm's output is the same pre-ReLU feature).
        ce_weight: weight of the cross-entropy (default 1).
        kd_weight: weight of Hinton KD (default 0: OFD + CE, as in the paper).
        **kwargs: ``temperature``, ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, student_layers: list[str], teacher_layers: list[str] | None = None,
                 transfer_weight: float = 1e-3, margin_source: str = "bn",
                 teacher_bn_layers: list[str] | None = None, stage_weights: list[float] | None = None,
                 pre_activation: bool = True, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 **kwargs) -> None:
        student_layers, teacher_layers = paired_layers("OFD", student_layers, teacher_layers)
        n = len(student_layers)
        if margin_source not in MARGIN_SOURCES:
            raise KDConfigError(f"OFD: margin_source must be 'bn' (the teacher's batch norm before "
                                f"each ReLU, the paper) or 'data' (statistics of the teacher's "
                                f"pre-ReLU responses, for teachers without batch norm), got "
                                f"{margin_source!r}.")
        if teacher_bn_layers is not None and (margin_source != "bn" or len(teacher_bn_layers) != n):
            raise KDConfigError(f"OFD: teacher_bn_layers lists the teacher's batch norm before each "
                                f"tapped ReLU ({n} paths) and needs margin_source: bn; got "
                                f"{teacher_bn_layers} with margin_source {margin_source!r}.")
        if stage_weights is not None and (len(stage_weights) != n or any(not w >= 0 for w in stage_weights)):
            raise KDConfigError(f"OFD: stage_weights must give one weight >= 0 per layer ({n}), got "
                                f"{stage_weights}; leave it unset for the paper's 1/2^(n-1-i).")
        super().__init__(transfer_weight=transfer_weight, ce_weight=ce_weight, kd_weight=kd_weight,
                         **kwargs)
        self.margin_source = margin_source
        self.teacher_bn_layers = list(teacher_bn_layers) if teacher_bn_layers is not None else None
        self.stage_weights = list(stage_weights) if stage_weights is not None else None
        self.connectors = nn.ModuleList()
        self._margins_checked = False
        self.init_features(student_layers, teacher_layers, pre_activation=pre_activation)
        if self._features_built and margin_source == "bn":
            self._margins_from_bn()

    # ---- connectors and margins ----------------------------------------------------------------
    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        for i, (s_path, t_path, s, t) in enumerate(zip(self.student_layers, self.teacher_layers,
                                                       student_shapes, teacher_shapes)):
            if len(s) != len(t) or len(s) not in (2, 3):
                raise KDConfigError(
                    f"OFD: student layer '{s_path}' gives {describe(s)}, teacher layer '{t_path}' "
                    f"gives {describe(t)}; OFD compares feature maps of the same kind ([B, C, L] "
                    f"or [B, C, H, W]) through a 1x1 conv + BN connector. Tap the pre-ReLU outputs "
                    f"of the stages (e.g. relu1/relu2/relu3 of ConvNet1D, layerK.<last>.relu of a "
                    f"CIFAR ResNet).")
            self.connectors.append(ConvConnector(s[0], t[0], dims=len(s) - 1))
            self.register_buffer(f"margin_{i}", torch.full((t[0],), float("nan")))

    def _margins_from_bn(self) -> None:
        """Margins from the affine parameters of the teacher's batch norm before each ReLU."""
        bns = self.teacher_bn_layers or [self._find_bn(i) for i in range(len(self.teacher_layers))]
        for t_path, bn_path, margin in zip(self.teacher_layers, bns, self.margins):
            bn = resolve_module(self.teacher, bn_path)
            channels = getattr(bn, "num_features", None)
            if channels != margin.numel():
                raise KDConfigError(
                    f"OFD: teacher batch norm '{bn_path}' has {channels} channels but teacher "
                    f"layer '{t_path}' has {margin.numel()}; give the batch norm right before "
                    f"that ReLU in teacher_bn_layers.")
            margin.copy_(ofd_margin_from_bn(bn).to(margin))
        self.teacher_bn_layers = list(bns)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # builds the connectors and margin buffers if input_shape was unset
        if self.margin_source == "bn" and self._margins_unknown():
            self._margins_from_bn()

    def _margins_unknown(self) -> bool:
        return any(bool(torch.isnan(m).any()) for m in self.margins)

    @property
    def margins(self) -> list[Tensor]:
        """The per-channel margins, one ``[C_t]`` buffer per layer (NaN until known)."""
        return [getattr(self, f"margin_{i}") for i in range(len(self.teacher_layers))]

    def _find_bn(self, i: int) -> str:
        """Path of the teacher's batch norm whose output reaches tapped layer ``i``'s input
        through residual additions only."""
        t_path = self.teacher_layers[i]
        found = _batch_norms_feeding(self.teacher, t_path, self.pre_activation, self.input_shape)
        self._teacher_feature_taps.pop()  # that forward pass is not a training batch
        if len(found) == 1:
            return found[0]
        where = "before" if self.pre_activation else "at"
        if not found:
            raise KDConfigError(
                f"OFD: no batch norm of the teacher ({type(self.teacher).__name__}) feeds the tensor "
                f"{where} teacher layer '{t_path}', so the margins cannot come from batch-norm "
                f"parameters. Set margin_source: data (margins from the teacher's responses on the "
                f"training data), or name the batch norms in teacher_bn_layers.")
        raise KDConfigError(
            f"OFD: several teacher batch norms feed the tensor {where} teacher layer '{t_path}' "
            f"({', '.join(found)}); name the one of the main branch in teacher_bn_layers.")

    def on_train_start(self) -> None:
        super().on_train_start()
        self._margins_checked = False
        if self.margin_source == "data" and self._margins_unknown():
            self._margins_from_data()

    @torch.no_grad()
    def _margins_from_data(self, chunk: int = 1024) -> None:
        """Margins from the mean and standard deviation of each channel of the teacher's tapped
        responses over the training examples (every rank sees the same examples, so every rank
        computes the same margins)."""
        ds = getattr(getattr(self.trainer, "datamodule", None), "train_dataset", None)
        if ds is None or not hasattr(ds, "get_batch"):
            raise KDConfigError("OFD: margin_source: data needs the training examples of a "
                                "DistillDataModule; use margin_source: bn with a teacher that has "
                                "batch norms.")
        n = len(self.teacher_layers)
        sums, squares, counts = [0.0] * n, [0.0] * n, [0] * n
        for start in range(0, len(ds), chunk):
            x, _, _ = ds.get_batch(torch.arange(start, min(start + chunk, len(ds))))
            _, feats = self.frozen_teacher.outputs(x.to(self.device), None, from_cache=False)
            for i, f in enumerate(feats):
                f = f.double().transpose(0, 1).flatten(1)  # [C, examples x positions]
                sums[i] = sums[i] + f.sum(1)
                squares[i] = squares[i] + f.pow(2).sum(1)
                counts[i] += f.shape[1]
        for i, margin in enumerate(self.margins):
            mean = sums[i] / counts[i]
            std = (squares[i] / counts[i] - mean.pow(2)).clamp(min=0).sqrt()
            margin.copy_(ofd_margin(std, mean).to(margin))

    # ---- the loss ------------------------------------------------------------------------------
    def transfer_loss(self, feats, t_feats):
        margins = self.margins
        if not self._margins_checked:  # once (a check per step would synchronise with the GPU)
            if self._margins_unknown():
                raise KDConfigError("OFD: the margins are not known yet (margin_source: data "
                                    "measures them at the start of training); train with a "
                                    "Trainer, or use margin_source: bn.")
            self._margins_checked = True
        return "loss_ofd", ofd_loss([c(f) for c, f in zip(self.connectors, feats)], t_feats,
                                    margins, self.stage_weights)


def _batch_norms_feeding(net: nn.Module, layer: str, pre_activation: bool,
                         input_shape: Sequence[int]) -> list[str]:
    """Batch norms whose outputs reach the tapped tensor through residual additions, copies and
    views only (found in the autograd graph of one eval-mode forward pass of zeros)."""
    bns = {name: m for name, m in net.named_modules()
           if isinstance(m, BATCH_NORM_BASE)}
    outputs: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
             for name, m in bns.items()]
    was_training = net.training
    net.eval()
    try:
        with FeatureTaps(net, [layer], pre_activation) as taps, torch.enable_grad():
            param = next(net.parameters(), None)
            device = param.device if param is not None else None
            net(torch.zeros(2, *input_shape, device=device, requires_grad=True))
            (feature,) = taps.pop()
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    producer = {out.grad_fn: name for name, out in outputs.items() if out.grad_fn is not None}
    found, seen, stack = set(), set(), [feature.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in producer:
            found.add(producer[node])
        elif type(node).__name__.startswith(_PASS_THROUGH):
            stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(found)
