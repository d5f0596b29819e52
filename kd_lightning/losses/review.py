r"""Knowledge review (ReviewKD): attention-based fusion and the hierarchical context loss.

Reference:
    Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021
    (arXiv:2104.09044).

ReviewKD lets each teacher level supervise a *fusion* of the student's features of the same and
all deeper levels. Going from the deepest student level to the shallowest, an attention-based
fusion module (:class:`ABF`) turns the student feature into ``mid`` channels, merges it with the
running fused feature of the deeper levels (upsampled to its size) through a 2-channel spatial
attention, and projects the result to the teacher's channels (:func:`review_chain`). Each output
is compared with the teacher's feature of its level by the hierarchical context loss
(:func:`hcl_loss`).

CIFAR-100 setting of the authors' code: the student levels are the outputs of the residual stages
plus the pooled feature (as a ``1 x 1`` map; the deepest level), the teacher levels the matching
*pre-ReLU* stage outputs plus its pooled feature; ``mid = min(512, C_deepest)``; the loss weight
depends on the pair (``5.0`` for resnet32x4 -> resnet8x4 and the WRN pairs, ``0.6`` for
resnet56 -> resnet20, ``1.0`` for resnet110 -> resnet32) and is warmed up linearly over the first
20 epochs (``min(1, epoch / 20)``), next to the cross entropy with weight 1.

Maps are ``[B, C, H, W]`` (``dims=2``) or ``[B, C, L]`` (``dims=1``); a ``[B, C]`` vector (a
pooled feature) is treated as a map of spatial size 1. The loss is computed in float32; teacher
features are detached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning import KDConfigError

__all__ = ["ABF", "build_abfs", "review_chain", "hcl_loss"]


def _as_map(x: Tensor, dims: int) -> Tensor:
    """A ``[B, C]`` vector as a map of spatial size 1; maps unchanged."""
    if x.dim() == 2:
        return x.view(*x.shape, *([1] * dims))
    return x


class ABF(nn.Module):
    r"""Attention-based fusion module of ReviewKD, for one student level.

    .. math::
        x' = \mathrm{BN}(W_1 * x), \qquad
        a = \sigma\big(W_a * [x';\ \mathrm{up}(r)]\big) \in [0, 1]^{2 \times H \times W}, \qquad
        f = a_0 \odot x' + a_1 \odot \mathrm{up}(r), \qquad
        y = \mathrm{BN}(W_2 * f)

    with :math:`W_1` a 1x1 convolution ``C_in -> mid`` (no bias), :math:`r` the fused feature of
    the next deeper level, :math:`\mathrm{up}` nearest-neighbour upsampling to ``x``'s size,
    :math:`W_a` a 1x1 convolution ``2 mid -> 2`` (with bias) and :math:`W_2` a 3x3 convolution
    ``mid -> C_out`` (no bias). The deepest level has nothing to fuse (``fuse=False``:
    :math:`f = x'`). If ``out_size`` is given and differs from ``f``'s size, ``f`` is resized
    (nearest) before :math:`W_2`, so that ``y`` matches the teacher's level. Initialisation as
    in the authors' code (Kaiming-uniform with ``a=1`` for :math:`W_1, W_2`).

    ``forward(x, residual=None, out_size=None)`` returns ``(y, f)``: the output compared with
    the teacher, and the fused feature passed to the next shallower level.

    Args:
        in_channels: ``C_in``, the student level's channels.
        mid_channels: ``mid``, the common width of the fused features.
        out_channels: ``C_out``, the teacher level's channels.
        fuse: whether this level fuses a deeper one (every level but the deepest).
        dims: 2 or 1.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool,
                 dims: int = 2) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise KDConfigError(f"ABF: dims must be 1 ([B, C, L]) or 2 ([B, C, H, W]), got {dims}.")
        for name, value in (("in_channels", in_channels), ("mid_channels", mid_channels),
                            ("out_channels", out_channels)):
            if int(value) < 1:
                raise KDConfigError(f"ABF: {name} must be a positive integer, got {value}.")
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.dims, self.fuse = dims, bool(fuse)
        self.in_channels, self.mid_channels = int(in_channels), int(mid_channels)
        self.conv1 = nn.Sequential(conv(in_channels, mid_channels, kernel_size=1, bias=False),
                                   bn(mid_channels))
        self.conv2 = nn.Sequential(conv(mid_channels, out_channels, kernel_size=3, padding=1,
                                        bias=False), bn(out_channels))
        self.att_conv = (nn.Sequential(conv(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid())
                         if self.fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None = None,
                out_size: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        x = _as_map(x, self.dims)
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise KDConfigError(f"ABF expects a [B, {self.in_channels}, ...] map with {self.dims} "
                                f"spatial dims (or a [B, {self.in_channels}] vector), got "
                                f"{tuple(x.shape)}; build it with the tapped student level's "
                                f"channels.")
        x = self.conv1(x)
        if self.fuse:
            if residual is None:
                raise KDConfigError("ABF(fuse=True) needs the fused feature of the deeper level; "
                                    "use review_chain, which passes it.")
            if residual.dim() != x.dim() or residual.shape[1] != self.mid_channels:
                raise KDConfigError(f"ABF: the deeper level's fused feature has shape "
                                    f"{tuple(residual.shape)}, expected {self.mid_channels} "
                                    f"channels and {self.dims} spatial dims; build every ABF of "
                                    f"the chain with the same mid_channels.")
            up = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            att = self.att_conv(torch.cat([x, up], dim=1))
            x = x * att[:, 0:1] + up * att[:, 1:2]
        if out_size is not None:
            size = tuple(int(v) for v in out_size)
            if len(size) != self.dims:
                raise KDConfigError(f"ABF: out_size must have {self.dims} entries, got {size}.")
            if tuple(x.shape[2:]) != size:
                x = F.interpolate(x, size=size, mode="nearest")
        return self.conv2(x), x


def build_abfs(in_channels: Sequence[int], out_channels: Sequence[int],
               mid_channels: int | None = None, dims: int = 2) -> nn.ModuleList:
    """The ABF modules of a review chain, ordered shallow to deep like the features.

    Args:
        in_channels: the student levels' channels, shallow to deep.
        out_channels: the teacher levels' channels, same order.
        mid_channels: default ``min(512, in_channels[-1])`` (authors' code).
        dims: 2 or 1.

    Every module fuses except the deepest.
    """
    if len(in_channels) == 0 or len(in_channels) != len(out_channels):
        raise KDConfigError(f"build_abfs: need one teacher level per student level (at least "
                            f"one), got {len(in_channels)} student and {len(out_channels)} "
                            f"teacher channel counts.")
    mid = min(512, int(in_channels[-1])) if mid_channels is None else int(mid_channels)
    n = len(in_channels)
    return nn.ModuleList(ABF(c_in, mid, c_out, fuse=i < n - 1, dims=dims)
                         for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels)))


def review_chain(student_feats: Sequence[Tensor], abfs: Sequence[ABF],
                 out_sizes: Sequence[Sequence[int] | None] | None = None) -> list[Tensor]:
    r"""Run the review chain: fuse the student levels from the deepest to the shallowest.

    For levels ``i = n-1, ..., 0`` (deep to shallow): ``y_i, r_i = abfs[i](x_i, r_{i+1},
    out_sizes[i])``, with no residual at the deepest level. Returns ``[y_0, ..., y_{n-1}]``
    (shallow to deep), each to be compared with the teacher's level ``i`` by :func:`hcl_loss`.

    Args:
        student_feats: the student's features, shallow to deep (a ``[B, C]`` vector is a map of
            size 1).
        abfs: one :class:`ABF` per level, same order (:func:`build_abfs`); the deepest must not
            fuse, every other must.
        out_sizes: per level, the teacher level's spatial size (``None`` entries, or ``None``
            altogether, keep the student's size).
    """
    n = len(student_feats)
    if n == 0 or len(abfs) != n:
        raise KDConfigError(f"review_chain: need one ABF per student level (at least one), got "
                            f"{n} features and {len(abfs)} ABF modules.")
    if any(a.fuse for a in list(abfs)[-1:]) or not all(a.fuse for a in list(abfs)[:-1]):
        raise KDConfigError("review_chain: the deepest ABF (last) must have fuse=False and every "
                            "other fuse=True; build them with build_abfs.")
    sizes = [None] * n if out_sizes is None else list(out_sizes)
    if len(sizes) != n:
        raise KDConfigError(f"review_chain: {len(sizes)} out_sizes for {n} levels.")
    results: list[Tensor] = [None] * n  # type: ignore[list-item]
    residual = None
    for i in range(n - 1, -1, -1):
        results[i], residual = abfs[i](student_feats[i], residual, sizes[i])
    return results


def hcl_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor],
             levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    r"""Hierarchical context loss (HCL) of ReviewKD, summed over the levels.

    For one level with fused student feature :math:`F_s` and teacher feature :math:`F_t`:

    .. math:: L = \frac{\mathrm{MSE}(F_s, F_t) + \sum_{j=1}^{J} 2^{-j}\,
              \mathrm{MSE}(P_{l_j}(F_s), P_{l_j}(F_t))}{1 + \sum_{j=1}^{J} 2^{-j}}

    with :math:`P_l` adaptive average pooling to ``l x l`` (``l`` for 1D maps) and
    :math:`l_1 > l_2 > \dots` the pyramid sizes in ``levels`` that are strictly smaller than the
    map (``4, 2, 1`` in the authors' code; larger ones are skipped, and the weights halve only
    over the sizes used): the full-resolution term has weight 1, the used pooled terms
    :math:`\frac12, \frac14, \frac18`, normalised by their sum. MSE is the mean over all
    elements. A ``1 x 1`` level (the pooled feature) is its plain MSE. The per-level losses are
    summed, as in the authors' code.

    Args:
        student_feats: :func:`review_chain` outputs, shallow to deep.
        teacher_feats: the teacher's features, same order and shapes (constants).
        levels: pyramid sizes, largest first.
    """
    if len(student_feats) == 0 or len(student_feats) != len(teacher_feats):
        raise KDConfigError(f"hcl_loss: need one teacher feature per fused student feature (at "
                            f"least one), got {len(student_feats)} and {len(teacher_feats)}.")
    pyramid = [int(v) for v in levels]
    if any(v < 1 for v in pyramid) or pyramid != sorted(pyramid, reverse=True):
        raise KDConfigError(f"hcl_loss: levels must be positive pooled sizes in decreasing order "
                            f"(the authors use (4, 2, 1)), got {tuple(levels)}.")
    total = None
    for fs, ft in zip(student_feats, teacher_feats):
        s = fs.float()
        t = ft.detach().float()
        if s.dim() == 2:  # a pooled vector: a map of size 1, of the teacher's kind
            s = _as_map(s, t.dim() - 2 if t.dim() in (3, 4) else 1)
        if t.dim() == 2:
            t = _as_map(t, s.dim() - 2)
        if s.shape != t.shape or s.dim() not in (3, 4):
            raise KDConfigError(f"hcl_loss: fused student feature {tuple(fs.shape)} and teacher "
                                f"feature {tuple(ft.shape)} differ; build the ABFs with the "
                                f"teacher's channels and pass the teacher's sizes as out_sizes to "
                                f"review_chain.")
        pool = F.adaptive_avg_pool1d if s.dim() == 3 else F.adaptive_avg_pool2d
        size = min(s.shape[2:])
        loss = F.mse_loss(s, t)
        weight, norm = 1.0, 1.0
        for level in pyramid:
            if level >= size:
                continue
            weight /= 2.0
            out = level if s.dim() == 3 else (level, level)
            loss = loss + weight * F.mse_loss(pool(s, out), pool(t, out))
            norm += weight
        term = loss / norm
        total = term if total is None else total + term
    return total
