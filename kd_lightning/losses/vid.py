r"""Variational information distillation (VID).

Reference:
    Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation for Knowledge
    Transfer", CVPR 2019 (arXiv:1904.05835).

VID maximises a variational lower bound on the mutual information between a teacher layer
``t`` and a student layer ``s``. The intractable conditional :math:`p(t \mid s)` is replaced by a
Gaussian :math:`q(t \mid s) = \mathcal{N}(t;\ \mu(s),\ \mathrm{diag}\,\sigma^2)` whose mean is a
small regressor on the student's feature and whose variance is one learnable value per teacher
channel (homoscedastic over positions). Maximising the bound over the student, the regressor and
the variance amounts to minimising the negative log-likelihood of the teacher's feature under
``q``, :func:`vid_loss`.

Per layer pair the method owns a :class:`VIDRegressor` (the mean ``mu`` and the variance
parameter ``alpha``), which the optimizer trains together with the student. In the CRD benchmark
(Tian et al., ICLR 2020; the CIFAR-100 numbers usually quoted for VID) the pairs are the outputs
of the residual stages (all but the stem and the pooled feature), the per-pair losses are summed
and the sum is weighted by ``beta = 1`` next to the cross entropy (no KD term).

Maps are ``[B, C, L]`` (1D) or ``[B, C, H, W]`` (2D); vectors ``[B, D]`` are accepted too (the
regressor is then made of linear layers, which is what a 1x1 convolution is on a vector).
Teacher features are constants (detached), and the loss is computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning import KDConfigError
from kd_lightning.losses.feature import pool_to_smaller

__all__ = ["VIDRegressor", "vid_loss"]


def _softplus_inverse(y: float) -> float:
    """``x`` with ``log(1 + exp(x)) = y`` (``y > 0``), stable for large ``y``."""
    return y + math.log(-math.expm1(-y))


def _pointwise(in_ch: int, out_ch: int, dims: int) -> nn.Module:
    if dims == 0:
        return nn.Linear(in_ch, out_ch, bias=False)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    return conv(in_ch, out_ch, kernel_size=1, bias=False)


class VIDRegressor(nn.Module):
    r"""The Gaussian :math:`q(t \mid s)` of one VID layer pair: mean regressor and variance.

    .. math::
        \mu(s) = W_3 * \mathrm{ReLU}(W_2 * \mathrm{ReLU}(W_1 * s)), \qquad
        \sigma_c^2 = \mathrm{softplus}(\alpha_c) + \epsilon

    with :math:`W_i` 1x1 convolutions without bias (``C_s -> mid -> mid -> C_t``), as in the
    authors' code (carried over unchanged by the CRD benchmark), and one variance per teacher
    channel :math:`c`.

    Args:
        in_channels: ``C_s``, the student feature's channels.
        out_channels: ``C_t``, the teacher feature's channels.
        mid_channels: width of the two hidden 1x1 layers; default ``C_t`` (the CRD benchmark's
            choice for every CIFAR-100 pair).
        dims: 2 for ``[B, C, H, W]`` maps, 1 for ``[B, C, L]`` maps, 0 for ``[B, D]`` vectors.
        init_variance: :math:`\sigma^2` at initialisation, the same for every channel; ``5.0`` as
            in the authors' code (a large initial variance keeps the early loss, and so its pull
            on the student, small while ``mu`` is still untrained). :math:`\alpha` is initialised
            to :math:`\mathrm{softplus}^{-1}(\sigma^2_0 - \epsilon)`.
        eps: :math:`\epsilon > 0`, the variance floor (``1e-5``, authors' code).

    ``forward(student)`` returns ``(mean, variance)``: ``mean`` has the student's batch and
    spatial shape with ``C_t`` channels, ``variance`` is ``[C_t]`` float32.
    """

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None,
                 dims: int = 2, init_variance: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        if dims not in (0, 1, 2):
            raise KDConfigError(f"VIDRegressor: dims must be 0 (vectors), 1 ([B, C, L] maps) or 2 "
                                f"([B, C, H, W] maps), got {dims}.")
        mid = out_channels if mid_channels is None else mid_channels
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("mid_channels", mid)):
            if int(value) < 1:
                raise KDConfigError(f"VIDRegressor: {name} must be a positive integer, got {value}.")
        if not eps > 0:
            raise KDConfigError(f"VIDRegressor: eps must be > 0 (it keeps the variance away from "
                                f"zero), got {eps}.")
        if not init_variance > eps:
            raise KDConfigError(f"VIDRegressor: init_variance must be larger than eps={eps} (the "
                                f"variance is softplus(alpha) + eps), got {init_variance}; the "
                                f"paper's setting is 5.0.")
        self.dims = dims
        self.eps = float(eps)
        self.mean = nn.Sequential(
            _pointwise(in_channels, mid, dims), nn.ReLU(),
            _pointwise(mid, mid, dims), nn.ReLU(),
            _pointwise(mid, out_channels, dims),
        )
        self.alpha = nn.Parameter(torch.full((out_channels,), _softplus_inverse(init_variance - eps)))

    def variance(self) -> Tensor:
        r""":math:`\sigma^2 = \mathrm{softplus}(\alpha) + \epsilon`, ``[C_t]`` float32."""
        return F.softplus(self.alpha.float()) + self.eps

    def forward(self, student: Tensor) -> tuple[Tensor, Tensor]:
        expected = self.dims + 2
        if student.dim() != expected:
            kind = {0: "[B, D] vector", 1: "[B, C, L] map", 2: "[B, C, H, W] map"}[self.dims]
            raise KDConfigError(f"VIDRegressor(dims={self.dims}) expects a {kind}, got shape "
                                f"{tuple(student.shape)}; build the regressor with the dims of the "
                                f"tapped student layer.")
        return self.mean(student), self.variance()


def vid_loss(mean: Tensor, variance: Tensor, teacher: Tensor) -> Tensor:
    r"""VID loss of Ahn et al. (CVPR 2019), one layer pair.

    .. math:: L_{VID} = \mathrm{mean}_{b, c, p}\ \frac12 \Big( \log \sigma_c^2
              + \frac{(t_{b,c,p} - \mu_{b,c,p}(s))^2}{\sigma_c^2} \Big)

    the negative log-likelihood of the teacher's feature :math:`t` under
    :math:`\mathcal{N}(\mu(s), \sigma^2)`, averaged over examples ``b``, channels ``c`` and
    positions ``p``. The constant :math:`\frac12 \log 2\pi` of the Gaussian density is left out
    (it has no gradient); the mean over every element is the reduction of the authors' code and
    of the CRD benchmark, whose weight ``beta = 1`` it goes with.

    Args:
        mean: :math:`\mu(s)`, ``[B, C_t, ...]`` or ``[B, C_t]`` (:class:`VIDRegressor` output).
        variance: :math:`\sigma^2`, ``[C_t]``, positive.
        teacher: the teacher's feature, ``C_t`` channels. If its spatial size differs from the
            mean's, the larger map is average-pooled to the smaller one (the CRD benchmark pools
            the student's feature before the regressor instead; with equal sizes, as in the
            paper's pairs, the two agree).
    """
    mu, t = mean.float(), teacher.detach().float()
    if mu.dim() in (3, 4) and t.dim() == mu.dim():
        mu, t = pool_to_smaller(mu, t)
    if mu.shape != t.shape:
        raise KDConfigError(f"vid_loss: the regressed mean {tuple(mean.shape)} and the teacher "
                            f"feature {tuple(teacher.shape)} do not match; build the VIDRegressor "
                            f"with out_channels equal to the teacher layer's channels "
                            f"({teacher.shape[1] if teacher.dim() > 1 else '?'}) and tap layers of "
                            f"the same kind (map with map, vector with vector).")
    var = variance.float()
    if var.dim() != 1 or var.shape[0] != mu.shape[1]:
        raise KDConfigError(f"vid_loss: variance must be one value per teacher channel, shape "
                            f"[{mu.shape[1]}], got {tuple(variance.shape)}.")
    var = var.view(1, -1, *([1] * (mu.dim() - 2)))
    nll = 0.5 * (torch.log(var) + (t - mu).pow(2) / var)
    return nll.mean()
