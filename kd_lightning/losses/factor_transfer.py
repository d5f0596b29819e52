r"""Factor transfer (FT): paraphraser, translator and the factor loss.

Reference:
    Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018 (arXiv:1802.04977).

Two stages:

1. **Paraphraser** (:class:`Paraphraser`): a convolutional auto-encoder on the teacher's last
   feature map, trained alone (teacher frozen) with the reconstruction loss
   :func:`ft_reconstruction_loss`. Its encoder output, with ``k * C_t`` channels for the
   *paraphrase rate* ``k`` (``0.5`` in the paper), is the teacher factor :math:`F_T`.
2. **Transfer**: the paraphraser is frozen; a **translator** (:class:`Translator`, a
   convolutional encoder on the student's last map, trained with the student) produces the
   student factor :math:`F_S` with the same number of channels, and the student minimises
   cross entropy plus ``beta`` times :func:`ft_loss`.

Both modules follow the authors' code: three 3x3 convolutions (the paraphraser's decoder:
three 3x3 transposed convolutions, stride 1, so the spatial size never changes), each followed
by a leaky ReLU of slope 0.1, with biases and no batch norm (``use_bn=True`` inserts a batch norm
after every convolution and drops the biases, a common variant). Maps are ``[B, C, H, W]``
(``dims=2``) or ``[B, C, L]`` (``dims=1``). Losses are computed in float32; teacher-side
tensors are detached.

The factor compared is the one of the paper, the authors' code and torchdistill: the whole
translator/paraphraser output, flattened per example and L2-normalised (:func:`ft_factor`).
RepDistiller's ``FactorTransfer`` (``distiller_zoo/FT.py``, used by the CRD benchmark) compares
a different factor, :math:`\mathrm{normalize}(\mathrm{mean}_c F^2)`: the channel mean of the
squared factor, a spatial map like attention transfer's, so its loss values and gradients differ
from these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning import KDConfigError
from kd_lightning.losses.feature import pool_to_smaller

__all__ = ["Paraphraser", "Translator", "ft_factor", "ft_loss", "ft_reconstruction_loss"]


def _check_dims(dims: int, who: str) -> None:
    if dims not in (1, 2):
        raise KDConfigError(f"{who}: dims must be 1 ([B, C, L] maps) or 2 ([B, C, H, W] maps), got "
                            f"{dims}.")


def _conv_block(in_ch: int, out_ch: int, dims: int, use_bn: bool, slope: float,
                transposed: bool = False) -> list[nn.Module]:
    if transposed:
        conv = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
    else:
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
    layers: list[nn.Module] = [conv(in_ch, out_ch, kernel_size=3, stride=1, padding=1,
                                    bias=not use_bn)]
    if use_bn:
        layers.append((nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(out_ch))
    layers.append(nn.LeakyReLU(slope))
    return layers


def _check_map(x: Tensor, channels: int, dims: int, who: str) -> None:
    if x.dim() != dims + 2 or x.shape[1] != channels:
        kind = "[B, C, L]" if dims == 1 else "[B, C, H, W]"
        raise KDConfigError(f"{who} was built for {kind} maps with C={channels}, got shape "
                            f"{tuple(x.shape)}; build it with the channels and dims of the tapped "
                            f"layer.")


class Paraphraser(nn.Module):
    r"""FT paraphraser: a convolutional auto-encoder on the teacher's last feature map.

    Encoder ``C_t -> C_t -> kC_t -> kC_t`` (3x3 convolutions), decoder ``kC_t -> kC_t -> C_t ->
    C_t`` (3x3 transposed convolutions), every layer followed by a leaky ReLU (slope 0.1), as in
    the authors' code.

    Args:
        in_channels: ``C_t``.
        rate: the paraphrase rate ``k``; the factor has ``max(1, round(k * C_t))`` channels
            (:attr:`factor_channels`). The paper uses ``k = 0.5``.
        dims: 2 for ``[B, C, H, W]``, 1 for ``[B, C, L]``.
        use_bn: batch norm after every convolution (default ``False``, as the authors).
        negative_slope: the leaky ReLU's slope (0.1).

    ``forward(x)`` returns ``(factor, reconstruction)``; :meth:`encode` only the factor.
    """

    def __init__(self, in_channels: int, rate: float = 0.5, dims: int = 2, use_bn: bool = False,
                 negative_slope: float = 0.1) -> None:
        super().__init__()
        _check_dims(dims, "Paraphraser")
        if int(in_channels) < 1:
            raise KDConfigError(f"Paraphraser: in_channels must be a positive integer, got "
                                f"{in_channels}.")
        if not rate > 0:
            raise KDConfigError(f"Paraphraser: the paraphrase rate k must be > 0 (the paper uses "
                                f"0.5), got {rate}.")
        c, f = int(in_channels), max(1, round(rate * in_channels))
        self.in_channels, self.factor_channels, self.dims = c, f, dims
        s = negative_slope
        self.encoder = nn.Sequential(
            *_conv_block(c, c, dims, use_bn, s), *_conv_block(c, f, dims, use_bn, s),
            *_conv_block(f, f, dims, use_bn, s))
        self.decoder = nn.Sequential(
            *_conv_block(f, f, dims, use_bn, s, True), *_conv_block(f, c, dims, use_bn, s, True),
            *_conv_block(c, c, dims, use_bn, s, True))

    def encode(self, x: Tensor) -> Tensor:
        """The teacher factor :math:`F_T` ``[B, kC_t, ...]``."""
        _check_map(x, self.in_channels, self.dims, "Paraphraser")
        return self.encoder(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encode(x)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    r"""FT translator: a convolutional encoder from the student's map to the factor space.

    ``C_s -> C_s -> F -> F`` with 3x3 convolutions and leaky ReLUs (slope 0.1), as in the
    authors' code, where ``F`` is the paraphraser's :attr:`Paraphraser.factor_channels`.

    Args:
        in_channels: ``C_s``.
        factor_channels: ``F``, pass ``paraphraser.factor_channels``.
        dims, use_bn, negative_slope: as for :class:`Paraphraser`.
    """

    def __init__(self, in_channels: int, factor_channels: int, dims: int = 2,
                 use_bn: bool = False, negative_slope: float = 0.1) -> None:
        super().__init__()
        _check_dims(dims, "Translator")
        if int(in_channels) < 1 or int(factor_channels) < 1:
            raise KDConfigError(f"Translator: in_channels and factor_channels must be positive "
                                f"integers, got {in_channels} and {factor_channels}.")
        c, f = int(in_channels), int(factor_channels)
        self.in_channels, self.factor_channels, self.dims = c, f, dims
        s = negative_slope
        self.encoder = nn.Sequential(
            *_conv_block(c, c, dims, use_bn, s), *_conv_block(c, f, dims, use_bn, s),
            *_conv_block(f, f, dims, use_bn, s))

    def forward(self, x: Tensor) -> Tensor:
        _check_map(x, self.in_channels, self.dims, "Translator")
        return self.encoder(x)


def ft_factor(factor: Tensor) -> Tensor:
    r"""A factor flattened per example and L2-normalised: :math:`F / \|F\|_2`, ``[B, D]`` float32."""
    return F.normalize(factor.float().flatten(1), p=2, dim=1)


def ft_loss(factor_student: Tensor, factor_teacher: Tensor, p: int = 1,
            reduction: str = "mean") -> Tensor:
    r"""Factor-transfer loss of Kim et al. (NeurIPS 2018).

    .. math:: L_{FT} = \Big\| \frac{F_T}{\|F_T\|_2} - \frac{F_S}{\|F_S\|_2} \Big\|_p

    with the factors flattened per example (:func:`ft_factor`) and ``p = 1`` (the paper's
    choice). The student's total loss is
    :math:`L_{cls} + \beta L_{FT}`; ``beta = 500`` in the authors' CIFAR code, which reduces the
    L1 difference by its mean over every element -- the default ``reduction="mean"`` here, with
    which that ``beta`` goes.

    Args:
        factor_student: translator output :math:`F_S` ``[B, F, ...]``.
        factor_teacher: paraphraser factor :math:`F_T` ``[B, F, ...]`` (a constant). Maps of
            different spatial size are average-pooled to the smaller size first.
        p: 1 or 2.
        reduction: ``"mean"``: :math:`\mathrm{mean}_{b,i} |d_{b,i}|^p` over examples and factor
            elements (authors' code); ``"batchmean"``: :math:`\mathrm{mean}_b \|d_b\|_p`, the
            norm of the formula above averaged over the batch.
    """
    if p not in (1, 2):
        raise KDConfigError(f"ft_loss: p must be 1 (the paper's choice) or 2, got {p}.")
    if reduction not in ("mean", "batchmean"):
        raise KDConfigError(f"ft_loss: reduction must be 'mean' (element mean, authors' code, "
                            f"beta=500) or 'batchmean' (per-example p-norm, batch mean), got "
                            f"{reduction!r}.")
    fs, ft = factor_student.float(), factor_teacher.detach().float()
    if fs.dim() in (3, 4) and ft.dim() == fs.dim():
        fs, ft = pool_to_smaller(fs, ft)
    if fs.shape != ft.shape:
        raise KDConfigError(f"ft_loss: student factor {tuple(factor_student.shape)} and teacher "
                            f"factor {tuple(factor_teacher.shape)} do not match; build the "
                            f"Translator with factor_channels=paraphraser.factor_channels.")
    d = ft_factor(ft) - ft_factor(fs)
    if reduction == "mean":
        return d.abs().pow(p).mean()
    return torch.linalg.vector_norm(d, ord=p, dim=1).mean()


def ft_reconstruction_loss(reconstruction: Tensor, target: Tensor, p: int = 2) -> Tensor:
    r"""Paraphraser reconstruction loss of Kim et al. (NeurIPS 2018), stage 1 of FT.

    .. math:: L_{rec} = \mathrm{mean}\, |x - P(x)|^p

    with :math:`x` the teacher's feature map and :math:`P(x)` the paraphraser's reconstruction,
    averaged over every element. The paper writes the squared L2 distance (``p = 2``, the
    default); the authors' code trains with the L1 distance (``p = 1``).

    Args:
        reconstruction: :math:`P(x)` ``[B, C_t, ...]`` (second output of :class:`Paraphraser`).
        target: :math:`x`, the teacher's map (a constant), same shape.
        p: 2 or 1.
    """
    if p not in (1, 2):
        raise KDConfigError(f"ft_reconstruction_loss: p must be 2 (squared error, the paper) or 1 "
                            f"(absolute error, the authors' code), got {p}.")
    r, x = reconstruction.float(), target.detach().float()
    if r.shape != x.shape:
        raise KDConfigError(f"ft_reconstruction_loss: reconstruction {tuple(reconstruction.shape)} "
                            f"and target {tuple(target.shape)} differ; the paraphraser must be "
                            f"built with in_channels equal to the teacher map's channels.")
    return (r - x).abs().pow(p).mean()
