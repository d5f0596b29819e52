"""An ensemble of networks as one teacher: the average prediction of its members.

Allen-Zhu & Li, "Towards Understanding Ensemble, Knowledge Distillation and Self-Distillation in
Deep Learning", ICLR 2023 (arXiv:2012.09816): an ensemble of independently trained networks
learns more of the features that carry the label than any one member, and a single student
distilled from the ensemble's average prediction can learn them too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning import KDConfigError
from kd_lightning.models.weights import load_teacher_weights

__all__ = ["EnsembleTeacher"]

AVERAGES = ("probs", "logits")


class EnsembleTeacher(nn.Module):
    r"""Several networks whose forward is their average prediction, returned as logits.

    With member logits :math:`z_1, \dots, z_M`:

    * ``average="probs"`` (default): :math:`z = \log \frac{1}{M} \sum_m \mathrm{softmax}(z_m)`,
      computed as ``logsumexp_m(log_softmax(z_m)) - log M``;
    * ``average="logits"``: :math:`z = \frac{1}{M} \sum_m z_m`.

    Why the log of the mean probability by default: an ensemble predicts the mixture
    :math:`\bar p = \frac{1}{M}\sum_m p_m` of its members' distributions (the average of deep
    ensembles, Lakshminarayanan et al., NeurIPS 2017); its accuracy and calibration are those of
    :math:`\bar p`. Since :math:`\mathrm{softmax}(\log \bar p) = \bar p`, the log-mean-probability is
    a logit vector whose softmax *is* the ensemble's prediction, so every response-based loss
    (written on logits) sees exactly that prediction at temperature 1, and at temperature
    :math:`T` the tempered mixture :math:`\propto \bar p^{1/T}`. The mean of the logits instead
    gives the renormalised *geometric* mean of the members' distributions: one member that rules
    a class out vetoes it, and the result is generally sharper than the mixture when members
    disagree; at temperature :math:`T` it equals the geometric mean of the members' tempered
    distributions (averaging commutes with the temperature). It is the average used by
    Allen-Zhu & Li's analysis of ensembles (ICLR 2023), offered as ``"logits"``.

    The ensemble is a teacher for *response-based* methods (ResponseKD, DKD, DIST,
    StandardizedKD, LogitMatching, WassersteinKD, ...). It has no single feature map, so a
    feature- or embedding-based method that tries to tap it stops with a
    :class:`~kd_lightning.KDConfigError`.

    Use it from YAML as the method's teacher, with ``teacher_checkpoint: null``::

        teacher:
          class_path: kd_lightning.models.EnsembleTeacher
          init_args:
            members:
              - {class_path: kd_lightning.models.ConvNet1D, init_args: {width: 64}}
              - {class_path: kd_lightning.models.MLP, init_args: {hidden_dims: [256, 256]}}
            checkpoints: [runs/cnn/checkpoints/best.ckpt, runs/mlp/checkpoints/best.ckpt]
        teacher_checkpoint: null

    Args:
        members: the networks (any ``nn.Module`` mapping inputs to logits of the same number of
            classes; architectures may differ).
        checkpoints: one weights file per member (a ``kd-lightning fit`` checkpoint of
            :class:`~kd_lightning.methods.Supervised` or a plain ``state_dict``, loaded by
            :func:`~kd_lightning.models.weights.load_teacher_weights`), ``None`` for a member used
            as it is; ``None`` (default) uses every member as it is.
        average: ``"probs"`` (default) or ``"logits"``, see above.
    """

    #: read by :func:`~kd_lightning.models.taps.resolve_module`: an ensemble cannot be tapped
    feature_taps_refused = (
        "the teacher is an EnsembleTeacher, which has no single feature map to distil (each "
        "member has its own); use it with a response-based method (ResponseKD, DKD, DIST, "
        "StandardizedKD, LogitMatching, WassersteinKD, ...), or give one member as the teacher "
        "of a feature-based method.")

    def __init__(self, members: Sequence[nn.Module], checkpoints: Sequence[str | None] | None = None,
                 average: str = "probs") -> None:
        super().__init__()
        members = list(members)
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise KDConfigError(
                "EnsembleTeacher: members must be a non-empty list of networks (class_path + "
                f"init_args each), got {members!r}.")
        if average not in AVERAGES:
            raise KDConfigError(f"EnsembleTeacher: average must be one of {AVERAGES}, got {average!r}.")
        if checkpoints is not None:
            checkpoints = list(checkpoints)
            if len(checkpoints) != len(members):
                raise KDConfigError(
                    f"EnsembleTeacher: {len(members)} members but {len(checkpoints)} checkpoints; "
                    f"give one checkpoint per member, in the same order (null for a member used "
                    f"as it is).")
            for i, (net, path) in enumerate(zip(members, checkpoints)):
                if path is not None:
                    try:
                        load_teacher_weights(net, path)
                    except KDConfigError as err:
                        raise KDConfigError(f"EnsembleTeacher member {i}: {err}") from None
        self.members = nn.ModuleList(members)
        self.checkpoints = checkpoints  # (named in the line a fit prints about its teacher)
        self.average = average

    def member_logits(self, x: Tensor) -> Tensor:
        """Every member's logits, stacked: ``[M, B, K]``."""
        outs = [net(x) for net in self.members]
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) > 1:
            raise KDConfigError(
                f"EnsembleTeacher: the members' outputs differ in shape ({sorted(shapes)}); every "
                f"member must return logits [batch, num_classes] for the same classes.")
        return torch.stack(outs)

    def forward(self, x: Tensor) -> Tensor:
        """The ensemble's logits ``[B, K]`` (float32): log mean probability or mean logit."""
        z = self.member_logits(x).float()
        if self.average == "logits":
            return z.mean(0)
        return torch.logsumexp(F.log_softmax(z, dim=-1), dim=0) - math.log(len(self.members))

    def extra_repr(self) -> str:
        return f"average={self.average!r}"
