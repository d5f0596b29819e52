"""Feature-based distillation losses: hints, FSP matrices, activation boundaries, attention.

References:
    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (arXiv:1412.6550).
    Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning", CVPR 2017 (FSP).
    Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons", AAAI 2019 (AB).
    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017 (AT).

Feature maps are ``[B, C, L]`` (1D) or ``[B, C, H, W]`` (2D); vectors are ``[B, D]``. Where a
student map and a teacher map have different spatial sizes, the larger is average-pooled down to
the smaller (:func:`pool_to_smaller`). Teacher features are always treated as constants (detached),
and every loss is computed in float32 whatever the autocast dtype of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning import KDConfigError

__all__ = [
    "pool_to_smaller",
    "hint_loss",
    "fsp_matrix",
    "fsp_loss",
    "ab_loss",
    "attention_map",
    "at_loss",
]


def _is_map(t: Tensor) -> bool:
    return t.dim() in (3, 4)


def _require_map(t: Tensor, what: str) -> None:
    if not _is_map(t):
        raise ValueError(f"{what} must be a feature map [B, C, L] or [B, C, H, W], got shape "
                         f"{tuple(t.shape)}.")


def _pool(t: Tensor, size: tuple[int, ...]) -> Tensor:
    if tuple(t.shape[2:]) == size:
        return t
    return F.adaptive_avg_pool1d(t, size) if t.dim() == 3 else F.adaptive_avg_pool2d(t, size)


def pool_to_smaller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool two maps of the same dimensionality to their common (smaller) spatial size.

    Each spatial dimension is reduced to ``min`` of the two sizes with adaptive average pooling
    (``[B, C, 19]`` and ``[B, C, 10]`` -> both ``[B, C, 10]``); maps of equal size are returned
    unchanged. The channel counts may differ.
    """
    _require_map(a, "first map")
    _require_map(b, "second map")
    if a.dim() != b.dim():
        raise ValueError(f"cannot pool a {a.dim() - 2}D map {tuple(a.shape)} and a "
                         f"{b.dim() - 2}D map {tuple(b.shape)} to a common size.")
    size = tuple(min(x, y) for x, y in zip(a.shape[2:], b.shape[2:]))
    return _pool(a, size), _pool(b, size)


def _align(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Same-size float32 student and (detached) teacher features: pooled maps or flat vectors."""
    s, t = student.float(), teacher.detach().float()
    if _is_map(s) and _is_map(t) and s.dim() == t.dim():
        s, t = pool_to_smaller(s, t)
    elif s.dim() == 2 or t.dim() == 2:
        s, t = s.flatten(1), t.flatten(1)
    if s.shape != t.shape:
        raise ValueError(f"student feature {tuple(student.shape)} and teacher feature "
                         f"{tuple(teacher.shape)} cannot be compared (after pooling: "
                         f"{tuple(s.shape)} vs {tuple(t.shape)}); map the student's through a "
                         f"connector first.")
    return s, t


def hint_loss(student_regressed: Tensor, teacher: Tensor) -> Tensor:
    r"""FitNets hint loss (Romero et al., ICLR 2015, Eq. 3), as a mean squared error.

    .. math:: L_{HT} = \mathrm{mean}\big( (u_h(x) - r(v_g(x)))^2 \big)

    ``u_h`` is the teacher's hint layer, ``v_g`` the student's guided layer and ``r`` the
    regressor (a connector, :mod:`kd_lightning.models.connectors`), already applied by the caller:
    ``student_regressed = r(v_g(x))``. The paper writes :math:`\tfrac12\|u_h - r(v_g)\|^2`;
    the mean over elements (as in the CRD benchmark's implementation) only rescales it, which is
    why the single-stage weight is 100.

    Args:
        student_regressed: ``[B, C_t, ...]`` or ``[B, D_t]``, the regressor's output.
        teacher: the teacher's hint feature (maps of another spatial size are pooled to the
            smaller size; a map against a vector is flattened).
    """
    s, t = _align(student_regressed, teacher)
    return F.mse_loss(s, t)


FSP_POOL_OPTIONS = (None, "smaller")


def fsp_matrix(f1: Tensor, f2: Tensor, pool: str | None = None) -> Tensor:
    r"""Flow-of-solution-procedure (FSP) matrix of Yim et al. (CVPR 2017, Eq. 1).

    .. math:: G_{ij}(x) = \sum_{s=1}^{h} \sum_{t=1}^{w} \frac{F^1_{s,t,i}(x)\, F^2_{s,t,j}(x)}{h \times w}

    i.e. the inner product of channel ``i`` of the first map with channel ``j`` of the second,
    averaged over the ``h x w`` positions (``L`` positions for 1D maps). As in the paper, the two
    maps must have the same spatial size: Yim et al. pair the first and the last feature map of a
    residual stage (same resolution, the stage's "flow").

    Args:
        f1: ``[B, m, L]`` or ``[B, m, H, W]``.
        f2: ``[B, n, L]`` or ``[B, n, H, W]``, the same dimensionality and, by default, the same
            spatial size as ``f1``.
        pool: ``None`` (default, the paper's definition): maps of different spatial sizes are
            an error. ``"smaller"``: the larger map is first average-pooled to the smaller one's
            size (adaptive average pooling, :func:`pool_to_smaller`) -- the convention of the CRD
            benchmark's implementation, which pairs the outputs of consecutive stages; this is a
            variant, not Eq. 1 (the pooled map is not a layer of the network).

    Returns:
        ``[B, m, n]`` float32.

    Raises:
        KDConfigError: the spatial sizes differ and ``pool`` is ``None``, or ``pool`` is not one
            of the options.
    """
    _require_map(f1, "fsp_matrix: f1")
    _require_map(f2, "fsp_matrix: f2")
    if pool not in FSP_POOL_OPTIONS:
        raise KDConfigError(f"fsp_matrix: pool must be None (the paper: maps of the same spatial "
                            f"size) or 'smaller' (average-pool the larger map), got {pool!r}.")
    a, b = f1.float(), f2.float()
    if a.shape[2:] != b.shape[2:]:
        if pool is None:
            raise KDConfigError(
                f"fsp_matrix: the two feature maps have different spatial sizes, "
                f"{tuple(f1.shape)} and {tuple(f2.shape)} (spatial {tuple(f1.shape[2:])} vs "
                f"{tuple(f2.shape[2:])}). Yim et al.'s FSP matrix G_ij = sum_(s,t) F1_(s,t,i) "
                f"F2_(s,t,j) / (h w) is defined between two maps of the same h x w. Pair two "
                f"layers of the same resolution (e.g. the first and the last feature map of one "
                f"residual stage), or pass pool='smaller' to average-pool the larger map to the "
                f"smaller one's size first (the CRD benchmark's variant).")
        a, b = pool_to_smaller(a, b)
    a, b = a.flatten(2), b.flatten(2)  # [B, m, hw], [B, n, hw]
    with torch.autocast(device_type=a.device.type, enabled=False):  # bmm would run in bf16/fp16
        return torch.bmm(a, b.transpose(1, 2)) / a.shape[-1]


def fsp_loss(g_student: Sequence[Tensor], g_teacher: Sequence[Tensor],
             weights: Sequence[float] | None = None) -> Tensor:
    r"""FSP distillation loss of Yim et al. (CVPR 2017, Eq. 2).

    .. math:: L_{FSP} = \frac{1}{N} \sum_x \sum_{i=1}^{n} \lambda_i \,
              \big\| G_i^T(x) - G_i^S(x) \big\|_2^2

    The squared norm is the squared Frobenius distance (sum over all entries of the matrix), the
    outer sum runs over the ``n`` FSP matrices (layer pairs) and the mean over the examples of the
    batch. Yim et al. use equal weights :math:`\lambda_i`; the default is 1 for every pair.

    Args:
        g_student: ``n`` student FSP matrices ``[B, m_i, n_i]`` (:func:`fsp_matrix`).
        g_teacher: the matching teacher matrices (constants).
        weights: :math:`\lambda_i`, default all 1.
    """
    if len(g_student) != len(g_teacher):
        raise ValueError(f"{len(g_student)} student FSP matrices but {len(g_teacher)} teacher ones.")
    if weights is None:
        weights = [1.0] * len(g_student)
    if len(weights) != len(g_student):
        raise ValueError(f"{len(weights)} weights for {len(g_student)} FSP matrices.")
    total = None
    for lam, gs, gt in zip(weights, g_student, g_teacher):
        if gs.shape != gt.shape:
            raise ValueError(f"student FSP matrix {tuple(gs.shape)} and teacher FSP matrix "
                             f"{tuple(gt.shape)} differ in shape.")
        per_example = (gt.detach().float() - gs.float()).pow(2).flatten(1).sum(1)
        term = lam * per_example
        total = term if total is None else total + term
    return total.mean()


def ab_loss(student_pre: Tensor, teacher_pre: Tensor, margin: float = 1.0) -> Tensor:
    r"""Activation-boundary transfer loss of Heo et al. (AAAI 2019, Eq. 6).

    For each hidden neuron, with :math:`s` the student's pre-ReLU response (through a connector)
    and :math:`t` the teacher's pre-ReLU response:

    .. math:: \ell(s, t) = (s + m)^2 \, [s > -m,\ t \le 0] + (s - m)^2 \, [s \le m,\ t > 0]

    a squared hinge that pushes :math:`s` below :math:`-m` where the teacher's neuron is inactive
    and above :math:`m` where it is active, i.e. transfers the teacher's activation boundaries
    (which side of each neuron's boundary an example lies on), not its response values. Summed over
    the neurons of the layer (every channel and position), averaged over the batch.

    Args:
        student_pre: ``[B, C, ...]`` or ``[B, D]``, the connector's output.
        teacher_pre: the teacher's pre-ReLU response of the same shape (a map of another spatial
            size is pooled to the smaller one; a map against a vector is flattened). Only its sign
            is used.
        margin: :math:`m > 0` (default 1, as in the paper).
    """
    s, t = _align(student_pre, teacher_pre)
    inactive = (s > -margin) & (t <= 0)
    active = (s <= margin) & (t > 0)
    loss = (s + margin).pow(2) * inactive + (s - margin).pow(2) * active
    return loss.flatten(1).sum(1).mean()


def attention_map(feature: Tensor) -> Tensor:
    r"""Activation-based spatial attention map of Zagoruyko & Komodakis (ICLR 2017, Sec. 3.1).

    .. math:: Q(A) = \frac{1}{C} \sum_{c=1}^{C} A_c^2

    the channel mean of the squared activations (:math:`F^2_{\mathrm{sum}}` up to the constant
    ``1/C``, which the normalisation in :func:`at_loss` removes), computed in float32.

    Args:
        feature: ``[B, C, L]`` or ``[B, C, H, W]``.

    Returns:
        ``[B, L]`` or ``[B, H, W]`` (not yet flattened nor normalised).
    """
    _require_map(feature, "attention_map: feature")
    return feature.float().pow(2).mean(1)


def at_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
    r"""Attention-transfer loss of Zagoruyko & Komodakis (ICLR 2017, Eq. 2), without its weight.

    .. math:: L_{AT} = \sum_{j} \mathrm{mean}\Big( \Big(\frac{Q_S^j}{\|Q_S^j\|_2}
              - \frac{Q_T^j}{\|Q_T^j\|_2}\Big)^2 \Big)

    over the tapped layer pairs ``j``, with :math:`Q^j` the attention map
    (:func:`attention_map`) flattened per example and L2-normalised per example, and the mean
    over examples and positions (the paper's :math:`\frac{\beta}{2}\|\cdot\|_2` is implemented, as
    in the authors' code and the CRD benchmark, as ``beta * mean(square)`` with ``beta = 1000``;
    the caller multiplies by ``beta``). Channel counts may differ between student and teacher; if
    the spatial sizes differ, the larger attention map is average-pooled to the smaller one.

    Args:
        student_feats: student maps ``[B, C_s, ...]``.
        teacher_feats: teacher maps ``[B, C_t, ...]`` (constants), same dimensionality pairwise.
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"{len(student_feats)} student maps but {len(teacher_feats)} teacher maps.")
    total = None
    for fs, ft in zip(student_feats, teacher_feats):
        qs, qt = attention_map(fs).unsqueeze(1), attention_map(ft.detach()).unsqueeze(1)
        qs, qt = pool_to_smaller(qs, qt)
        qs = F.normalize(qs.flatten(1), dim=1)
        qt = F.normalize(qt.flatten(1), dim=1)
        term = (qs - qt).pow(2).mean()
        total = term if total is None else total + term
    return total
