"""Factor transfer: Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor
Transfer", NeurIPS 2018."""

from __future__ import annotations

import torch

from kd_lightning import KDConfigError
from kd_lightning.losses.factor_transfer import (
    Paraphraser,
    Translator,
    ft_loss,
    ft_reconstruction_loss,
)
from kd_lightning.methods.base import Losses
from kd_lightning.methods.feature import Shape, TwoStageFeatureDistillation, describe, is_map


class FactorTransfer(TwoStageFeatureDistillation):
    r"""Factor transfer (Kim et al., 2018): a paraphraser, a translator and two stages.

    **Stage 1** (epochs ``0 .. stage1_epochs - 1``): the *paraphraser*
    :math:`P` (:class:`~kd_lightning.losses.Paraphraser`, a convolutional auto-encoder owned by
    the method) learns to reconstruct the teacher's last feature map :math:`x`:
    :math:`L_{rec} = \mathrm{mean}\,|x - P(x)|^p` (:func:`~kd_lightning.losses.ft_reconstruction_loss`).
    The student is not trained in this stage (and not even run): the paper trains the paraphraser
    on the teacher alone, unsupervised, before the student starts, and the CRD benchmark does the
    same in a separate initialisation phase. Keeping that phase inside one fit lets one optimizer
    and one LR schedule cover both stages and makes the run resumable in either stage.

    **Stage 2** (the remaining epochs): the paraphraser is frozen (run in eval mode without
    gradient) and its encoder gives the teacher factor :math:`F_T`; the *translator*
    (:class:`~kd_lightning.losses.Translator`, trained with the student) maps the student's last
    map to the student factor :math:`F_S`, and the student minimises

    .. math:: L = w_{ce}\,CE + \beta\, \Big\| \frac{F_T}{\|F_T\|_2} - \frac{F_S}{\|F_S\|_2} \Big\|_1

    (:func:`~kd_lightning.losses.ft_loss`, the L1 difference averaged over every element, as in
    the authors' code, with which :math:`\beta = 500` goes). :math:`\beta` is
    ``transfer_weight``. The stage is derived from ``current_epoch``, so a resumed run continues
    in its stage (a checkpoint holds the paraphraser and the translator). With
    ``stage1_epochs: 0`` (or a fraction that rounds to 0 epochs) the method is single-stage: the
    paraphraser's reconstruction loss and the student's loss are minimised together in every
    epoch, the teacher factor being a constant of the transfer term.

    Layers: the last feature map of each network (the output of its last residual stage: ``layer3``
    of CIFAR ResNets and WRNs; ``relu3`` of ConvNet1D), as in the paper. Both must be maps of the
    same kind (1D or 2D); a larger factor map is average-pooled to the smaller size.

    Logged terms: ``loss``, ``loss_rec`` (stage 1 / single stage), ``loss_ce`` (and ``loss_kd``)
    and ``loss_ft`` (stage 2 / single stage, weighted), ``stage``. Under DDP use
    ``--trainer.strategy ddp_find_unused_parameters_true`` (the student has no gradient in stage 1,
    the paraphraser none in stage 2).

    Args:
        student_layer: module path of the student's last map (e.g. ``layer3``).
        teacher_layer: module path of the teacher's last map; default: ``student_layer``.
        transfer_weight: :math:`\beta` (default 500, the authors' CIFAR setting).
        paraphrase_rate: the paraphrase rate :math:`k`; the factor has :math:`k C_t` channels
            (default 0.5, the paper's).
        reconstruction_p: ``p`` of the reconstruction loss: 2 (squared error, the paper; default)
            or 1 (absolute error, the authors' code).
        use_bn: batch norm after every convolution of the paraphraser and translator (default
            false, as the authors).
        stage1_epochs: length of the paraphraser stage: epochs (int) or a fraction of
            ``max_epochs`` (float in [0, 1)); 0 = single stage; default 0.1. (The CRD benchmark
            trains the paraphraser for 30 epochs before the student's 240, i.e. 30 of 270.)
        ce_weight: weight of the cross-entropy in stage 2 (default 1).
        kd_weight: weight of Hinton KD in stage 2 (default 0: FT + CE, as in the paper).
        **kwargs: ``temperature``, ``input_shape`` and
            :class:`~kd_lightning.methods.base.DistillationModule`'s arguments.
    """

    def __init__(self, student_layer: str, teacher_layer: str | None = None,
                 transfer_weight: float = 500.0, paraphrase_rate: float = 0.5,
                 reconstruction_p: int = 2, use_bn: bool = False, stage1_epochs: int | float = 0.1,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, **kwargs) -> None:
        if not isinstance(student_layer, str) or \
                not (teacher_layer is None or isinstance(teacher_layer, str)):
            raise KDConfigError(f"FactorTransfer takes one module path per network (its last "
                                f"feature map, e.g. student_layer: layer3), got student_layer="
                                f"{student_layer!r}, teacher_layer={teacher_layer!r}.")
        if not paraphrase_rate > 0:
            raise KDConfigError(f"FactorTransfer: paraphrase_rate k must be > 0 (the paper uses 0.5), "
                                f"got {paraphrase_rate}.")
        if reconstruction_p not in (1, 2):
            raise KDConfigError(f"FactorTransfer: reconstruction_p must be 2 (squared error, the "
                                f"paper) or 1 (absolute error, the authors' code), got "
                                f"{reconstruction_p}.")
        super().__init__(stage1_epochs=stage1_epochs, transfer_weight=transfer_weight,
                         ce_weight=ce_weight, kd_weight=kd_weight, **kwargs)
        self.paraphrase_rate, self.reconstruction_p, self.use_bn = paraphrase_rate, reconstruction_p, use_bn
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None
        self.init_features([student_layer], [teacher_layer or student_layer])

    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        (s,), (t,) = student_shapes, teacher_shapes
        if not (is_map(s) and is_map(t) and len(s) == len(t)):
            raise KDConfigError(
                f"FactorTransfer: student layer '{self.student_layers[0]}' gives {describe(s)} and "
                f"teacher layer '{self.teacher_layers[0]}' gives {describe(t)}; the paraphraser and "
                f"translator are convolutional, so both must be feature maps of the same kind "
                f"([B, C, L] or [B, C, H, W]). Tap the last convolutional map (relu3 of ConvNet1D, "
                f"layer3 of a CIFAR ResNet or WRN).")
        dims = len(t) - 1
        self.paraphraser = Paraphraser(t[0], self.paraphrase_rate, dims, self.use_bn)
        self.translator = Translator(s[0], self.paraphraser.factor_channels, dims, self.use_bn)

    def teacher_factor(self, t_map: torch.Tensor) -> torch.Tensor:
        """:math:`F_T`: the frozen paraphraser's encoding of the teacher map (no gradient)."""
        was_training = self.paraphraser.training
        self.paraphraser.eval()
        try:
            with torch.no_grad():
                return self.paraphraser.encode(t_map)
        finally:
            self.paraphraser.train(was_training)

    def transfer_loss(self, feats, t_feats):
        return "loss_ft", ft_loss(self.translator(feats[0]), self.teacher_factor(t_feats[0]))

    def compute_losses(self, x, y, index):
        t_logits, (t_map,) = self.teacher_forward(x, index)
        terms = {}
        if self.single_stage or self.stage == 1:  # the paraphraser learns to reconstruct the map
            factor_t, reconstruction = self.paraphraser(t_map)
            terms["loss_rec"] = ft_reconstruction_loss(reconstruction, t_map, self.reconstruction_p)
            if not self.single_stage:
                return Losses(None, terms)
        else:
            factor_t = self.teacher_factor(t_map)
        logits, (f_s,) = self.student_forward(x)
        terms.update(self.task_terms(logits, y, x, index, t_logits))
        # the teacher factor is a constant of the transfer term (ft_loss detaches it)
        terms["loss_ft"] = self.transfer_weight * ft_loss(self.translator(f_s), factor_t)
        return Losses(logits, terms)
