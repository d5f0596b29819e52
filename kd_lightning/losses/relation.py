r"""Relation-based distillation: Relational Knowledge Distillation (RKD).

Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068).
Park et al., section 3: :math:`L_R(F_t, F_s) = L(\\phi_t(t_i, t_j), \\phi_s(s_i, s_j))` -- the
student matches the *relations* between examples of a batch, not the teacher's features, so the
two embeddings may have different widths.

Conventions (those of the authors' reference code, which the default weights w_d = 25,
w_a = 50 were tuned for): the Huber loss (smooth-L1, delta = 1) is averaged over all
``N x N`` distance entries and all ``N x N x N`` angle entries of a batch of ``N``; entries with a
repeated example (``i == j`` etc.) are zero on both sides and contribute zero loss. The teacher
side is computed without gradient.

Precision: everything is computed in float32 (float64 inputs stay float64) with autocast off,
from the explicit difference vectors :math:`e_i - e_j`, never from the Gram identity
:math:`\|e_i\|^2 + \|e_j\|^2 - 2 e_i^\top e_j` (which cancels terms of the size of the rows' norms):
a distance or a cosine is then accurate to float32 rounding whatever the norm of the rows, a
common offset, or how different the distances of one batch are, and two equal rows (duplicate
examples, collapsed features) are at distance exactly 0, since the difference of two
floating-point numbers is 0 exactly when they are equal. An embedding wider than the batch is
first written in an orthonormal basis of the span of its centred rows (at most N wide), which
keeps every distance and angle and makes the angle term's cost independent of the width
(``_span_coordinates``). The losses are returned in the embedding's dtype (float32 for
half-precision embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kd_lightning import KDConfigError

__all__ = ["pairwise_distances", "rkd_distance_loss", "rkd_angle_loss", "rkd_loss"]


def _check_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten both embeddings to ``[N, D]`` (at least float32); explain batches RKD cannot use."""
    if student.dim() < 1 or teacher.dim() < 1:
        raise KDConfigError("RKD needs batched embeddings [N, ...]; got a scalar.")
    if student.shape[0] != teacher.shape[0]:
        raise KDConfigError(
            f"RKD compares the relations between the same examples on the student and the "
            f"teacher side, but the student embedding has {student.shape[0]} rows and the teacher "
            f"embedding {teacher.shape[0]}. Feed both networks the same batch (and tap layers "
            f"whose output keeps the batch dimension first).")
    if student.shape[0] < 2:
        raise KDConfigError(
            f"RKD needs at least 2 examples per batch: its distance term compares pairs of "
            f"examples and its angle term triplets, and a batch of {student.shape[0]} has none "
            f"(the loss would be 0/0). Use data.batch_size >= 2, and data.drop_last: true when "
            f"the training set size leaves a last batch of one example (under DDP, per process).")
    return _upcast(student.reshape(len(student), -1)), _upcast(teacher.reshape(len(teacher), -1))


def _upcast(e: Tensor) -> Tensor:
    """float32 for half-precision (autocast) embeddings; float32 and float64 stay as they are."""
    return e if e.dtype in (torch.float32, torch.float64) else e.float()


def pairwise_distances(e: Tensor, squared: bool = False) -> Tensor:
    r"""Euclidean distances :math:`\|e_i - e_j\|_2` between the rows of ``e`` (``[N, D]`` -> ``[N, N]``).

    Computed from the difference vectors themselves (``torch.cdist`` without its matrix-product
    shortcut), in :math:`O(N^2 D)` time without materialising the ``[N, N, D]`` differences, in
    float32 (float64 stays float64) with autocast off. So each distance has the relative
    accuracy of float32 rounding whatever the norm of the rows or a common offset (the Gram
    identity :math:`\|e_i\|^2 + \|e_j\|^2 - 2 e_i^\top e_j` would lose
    :math:`\epsilon_{mach} \|e\|^2 / d_{ij}^2` of it), and two equal rows are at distance exactly
    0 with a zero gradient (as is the diagonal).
    """
    e = _upcast(e.reshape(len(e), -1))
    with torch.autocast(device_type=e.device.type, enabled=False):
        # the direct kernel: sqrt(sum_k (e_ik - e_jk)^2) per pair; its gradient at a zero
        # distance (the diagonal, equal rows) is 0
        d = torch.cdist(e, e, compute_mode="donot_use_mm_for_euclid_dist")
    return d * d if squared else d


#: Largest ``(|c_i| + |c_j|) / |e_i - e_j|`` (``c`` the centred rows) for which RKD works in the
#: coordinates of :func:`_span_coordinates`: a coordinate carries a rounding error of about
#: :math:`\epsilon_{mach} |c_i|`, so a difference keeps a relative accuracy of about
#: :math:`\epsilon_{mach}` times this ratio (below 1e-5 in float32).
_SPAN_CONDITION = 64.0


def _span_coordinates(e: Tensor, with_basis: bool) -> tuple[Tensor, Tensor | None]:
    r"""The rows of ``e`` (``[N, D]``) in an orthonormal basis ``Q`` (``[D, N_u]``) of the span of
    its centred distinct rows, and ``Q`` (if ``with_basis``); ``(e, None)`` where that is not
    narrower (``D <= N_u``) or not accurate enough.

    Every difference :math:`e_i - e_j` lies in that span and an orthonormal change of basis keeps
    every inner product of differences, so the distances and cosines are those of the rows
    themselves, at :math:`O(N^3 N_u)` cost for the angles instead of :math:`O(N^3 D)`, and a
    gradient ``g`` with respect to the coordinates is :math:`g Q^\top` with respect to the rows.
    Basis and coordinates are the QR factorisation of the centred distinct rows
    (:math:`C^\top = Q R`, coordinates :math:`R^\top`). Equal rows get the coordinates of their
    first occurrence bit for bit, so their difference stays exactly zero. A batch with a pair
    that is close compared with the rows' distance from the centre (:data:`_SPAN_CONDITION`;
    found from the Gram matrix of the centred rows, whose distances are accurate enough for
    that test) keeps its rows, as does one with a non-finite entry.
    """
    n, width = e.shape
    if width <= n:
        return e, None
    centred = e - e.mean(0)
    sq = centred.pow(2).sum(1)
    if not bool(torch.isfinite(sq).all()):
        return e, None
    gram_sq = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * (centred @ centred.T)).clamp_(min=0.0)
    radius = sq.sqrt()
    close = gram_sq * _SPAN_CONDITION ** 2 <= (radius.unsqueeze(0) + radius.unsqueeze(1)) ** 2
    close.fill_diagonal_(False)
    same = torch.eye(n, dtype=torch.bool, device=e.device)
    if bool(close.any()):
        i, j = close.nonzero(as_tuple=True)
        equal = (e[i] == e[j]).all(1)
        if not bool(equal.all()):  # a close pair of different rows: ill-conditioned here
            return e, None
        same[i, j] = True
    first = same.to(torch.uint8).argmax(1)  # each row's first equal row (itself at least)
    distinct = first == torch.arange(n, device=e.device)
    if width <= int(distinct.sum()):
        return e, None
    rows = centred[distinct]  # any common centre keeps the differences
    if with_basis:
        basis, triangle = torch.linalg.qr(rows.T)
    else:
        basis, triangle = None, torch.linalg.qr(rows.T, mode="r")[1]
    slot = torch.cumsum(distinct, 0) - 1  # each row's index among the distinct rows
    return triangle.T[slot[first]], basis


def _block_size(n: int, width: int, device: torch.device) -> int:
    """Vertices per block of :class:`_RKDTerms`: about 512k floats of ``[b, N, N + width]`` per
    block on a CPU (cache-sized blocks: large temporaries cost more to allocate than to compute),
    up to 64M on an accelerator (few kernel launches)."""
    budget = (1 << 19) if device.type == "cpu" else (1 << 26)
    return max(1, min(n, budget // max(1, n * (n + width))))


def _blocks(n: int, width: int, device: torch.device) -> list[slice]:
    b = _block_size(n, width, device)
    return [slice(j, min(n, j + b)) for j in range(0, n, b)]


def _differences(e: Tensor, vertices: slice) -> tuple[Tensor, Tensor, Tensor]:
    r"""For the vertices ``j`` of a block: the unit differences
    :math:`u_{ji} = (e_i - e_j) / \|e_i - e_j\|` (the zero vector where :math:`e_i = e_j`),
    ``[b, N, D]``, the distances :math:`\|e_i - e_j\|`, ``[b, N, 1]``, and the mask of non-zero
    differences (a NaN propagates: its distance is NaN and its mask False)."""
    v = e.unsqueeze(0) - e[vertices].unsqueeze(1)
    dist = torch.linalg.vector_norm(v, dim=2, keepdim=True)
    nonzero = dist > 0
    return v.div_(torch.where(nonzero, dist, 1.0)), dist, nonzero


class _RKDTerms(torch.autograd.Function):
    r"""The unweighted distance and angle terms and their gradient with respect to ``s``.

    Pass 1, per block of vertices ``j``: the difference vectors :math:`v_{ji} = e_i - e_j` of
    each side, their norms (the distances) and unit vectors ``U_j``; the cosines as the Gram
    matrices :math:`C_j = U_j U_j^\top` (``[b, N, N]``), the angle term's Huber sum and its
    derivative :math:`G_j = \mathrm{clamp}(C^s_j - C^t_j, -1, 1)` (symmetric, so
    :math:`\partial L_A / \partial U^s_j = 2 G_j U^s_j / N^3`), taken through
    :math:`u = v / \|v\|`: :math:`\partial L_A / \partial v = (g - u\, u^\top g) / \|v\|`.

    Distance term: :math:`\mu` over the :math:`N(N-1)` pairs ``i != j`` and
    :math:`L_D = \frac{1}{N^2}\sum_{ij} \ell_\delta(d^s_{ij}/\mu_s - d^t_{ij}/\mu_t)`. With
    :math:`h` the Huber derivative at the residuals,
    :math:`\partial L_D / \partial d^s_{ij} = \big(h_{ij} - \frac{1}{N(N-1)} \sum_{kl} h_{kl}
    d^s_{kl} / \mu_s\big) / (N^2 \mu_s)`; pass 2 (student only) sends it along the unit
    differences, :math:`\partial L_D / \partial v_{ji} = (\partial L_D / \partial d_{ji})\, u_{ji}`.

    A zero difference (``i == j``, equal rows) is a constant zero vector at a constant zero
    distance: no gradient. :math:`v_{ji} = s_i - s_j` sends :math:`\partial L / \partial v_{ji}`
    to rows ``i`` (+) and ``j`` (-).

    The gradient is computed with the value when ``s`` requires one, so no ``[N, N, N]`` or
    ``[N, N, D]`` tensor is stored: memory is one block's; time :math:`O(N^2 (D_s + D_t))` for
    the distances and :math:`O(N^3 (2 D_s + D_t))` for the angles (three batched matrix
    products), with each width at most the number of distinct rows (:func:`_span_coordinates`).
    First order only (no double backward).
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, distance: bool, angle: bool) -> tuple[Tensor, Tensor]:
        n = s.shape[0]
        need_grad = ctx.needs_input_grad[0]
        # each side in the coordinates of the span of its centred rows where that is narrower;
        # the student's gradient is mapped back through the same basis at the end
        s, basis = _span_coordinates(s, with_basis=need_grad)
        t, _ = _span_coordinates(t, with_basis=False)
        blocks = _blocks(n, s.shape[1] + t.shape[1], s.device)
        dist_term = ang_term = s.new_zeros(())
        grad_d = None
        # pass 1: the angle term and its gradient, and each side's distances
        d_s, d_t = [], []
        grad_a = torch.zeros_like(s) if need_grad and angle else None
        total = s.new_zeros(())
        for j in blocks:
            u_s, dist_s, nonzero = _differences(s, j)
            u_t, dist_t, _ = _differences(t, j)
            d_s.append(dist_s.squeeze(2))
            d_t.append(dist_t.squeeze(2))
            if not angle:
                continue
            c_s = torch.bmm(u_s, u_s.transpose(1, 2))
            c_t = torch.bmm(u_t, u_t.transpose(1, 2))
            total += F.smooth_l1_loss(c_s, c_t, reduction="sum")
            if grad_a is not None:
                g_u = torch.bmm(c_s.sub_(c_t).clamp_(-1.0, 1.0), u_s)
                g_v = g_u.sub_(u_s * (u_s * g_u).sum(2, keepdim=True))
                _scatter(grad_a, g_v.div_(torch.where(nonzero, dist_s, 1.0)).mul_(nonzero), j)
        if angle:
            ang_term = total / n ** 3
            if grad_a is not None:
                grad_a.mul_(2.0 / n ** 3)
        if distance:
            d_s, d_t = torch.cat(d_s), torch.cat(d_t)
            pairs = n * (n - 1)
            # every pair i != j counts, equal rows (distance 0) included, as in Park et al.'s
            # eq. 4; the clamp keeps an all-equal batch at 0 instead of 0/0
            tiny = torch.finfo(s.dtype).tiny
            mu_s = (d_s.sum() / pairs).clamp(min=tiny)
            psi_s, psi_t = d_s / mu_s, d_t / (d_t.sum() / pairs).clamp(min=tiny)
            dist_term = F.smooth_l1_loss(psi_s, psi_t, reduction="mean")
            if need_grad:
                # pass 2 (student only): dL/dd along the unit differences
                h = psi_s.sub_(psi_t).clamp_(-1.0, 1.0)
                g_dist = (h - (h * d_s).sum() / (pairs * mu_s)).div_(n * n * mu_s)
                grad_d = torch.zeros_like(s)
                for j in blocks:
                    u_s, _, nonzero = _differences(s, j)
                    _scatter(grad_d, u_s.mul_(g_dist[j].unsqueeze(2) * nonzero), j)
        if basis is not None:
            grad_d = None if grad_d is None else grad_d @ basis.T
            grad_a = None if grad_a is None else grad_a @ basis.T
        ctx.save_for_backward(grad_d, grad_a)
        return dist_term, ang_term

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dist: Tensor, grad_ang: Tensor):
        grad_d, grad_a = ctx.saved_tensors
        grad = None
        if grad_d is not None:
            grad = grad_d * grad_dist
        if grad_a is not None:
            grad = grad_a * grad_ang if grad is None else grad.add_(grad_a * grad_ang)
        return grad, None, None, None


def _scatter(grad: Tensor, g_v: Tensor, vertices: slice) -> None:
    """Add ``dL/dv`` for ``v[j, i] = s_i - s_j`` (``[b, N, D]``) to rows ``i`` (+) and ``j`` (-)."""
    grad += g_v.sum(0)
    grad[vertices] -= g_v.sum(1)


def _rkd_terms(s: Tensor, t: Tensor, distance: bool, angle: bool) -> tuple[Tensor, Tensor]:
    """Unweighted distance and angle terms (0 when not asked for), in ``s``'s dtype."""
    with torch.autocast(device_type=s.device.type, enabled=False):
        return _RKDTerms.apply(s, t.detach().to(s.dtype), distance, angle)


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Distance-wise RKD (Park et al. 2019, eq. 4-5).

    .. math::
        \psi_D(e_i, e_j) = \frac{1}{\mu} \|e_i - e_j\|_2,\quad
        \mu = \frac{1}{N (N - 1)} \sum_{i \ne j} \|e_i - e_j\|_2 \\
        L_{RKD-D} = \frac{1}{N^2} \sum_{i,j} \ell_\delta\big(\psi_D(t_i, t_j), \psi_D(s_i, s_j)\big)

    with :math:`\ell_\delta` the Huber loss (smooth-L1, :math:`\delta = 1`). Normalising by
    :math:`\mu` makes the term independent of the scale of each embedding; :math:`\mu` is the
    mean over all pairs of distinct examples, as Park et al. define it, so a pair of equal rows
    (a repeated example, collapsed features) counts with its distance 0. The distances are
    those of :func:`pairwise_distances` (exact to float32 rounding, 0 with a zero gradient for
    equal rows).

    Args:
        student: ``[N, ...]`` student embeddings (flattened to ``[N, D_s]``).
        teacher: ``[N, ...]`` teacher embeddings (``[N, D_t]``, any width); no gradient.
    """
    s, t = _check_pair(student, teacher)
    return _rkd_terms(s, t, distance=True, angle=False)[0]


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Angle-wise RKD (Park et al. 2019, eq. 6-7).

    .. math::
        \psi_A(e_i, e_j, e_k) = \cos\angle e_i e_j e_k
            = \Big\langle \frac{e_i - e_j}{\|e_i - e_j\|_2}, \frac{e_k - e_j}{\|e_k - e_j\|_2} \Big\rangle \\
        L_{RKD-A} = \frac{1}{N^3} \sum_{i,j,k}
            \ell_\delta\big(\psi_A(t_i, t_j, t_k), \psi_A(s_i, s_j, s_k)\big)

    A zero difference vector (``i == j``, or two equal rows) normalises to zero, so degenerate
    triplets give 0 on both sides (and no gradient).

    Computed as the paper writes it, from the unit difference vectors: for each vertex ``j`` the
    cosines are the Gram matrix of :math:`u_{ji} = (e_i - e_j) / \|e_i - e_j\|`, so every cosine
    has the accuracy of float32 rounding however different the lengths of its two sides (a law
    of cosines from the distances would lose :math:`\epsilon_{mach}\, d_{jk} / d_{ij}` of it).
    The vertices are processed in blocks, with the gradient computed alongside the value, so
    no ``[N, N, N]`` tensor is stored: :math:`O(N^3 (2 D_s + D_t))` time in batched matrix
    products, the widths first reduced to at most ``N`` (the span of the rows), and
    :math:`O(N^2 (N + D))` memory per block (see ``_RKDTerms``). The gradient is first order
    only (no double backward).
    """
    s, t = _check_pair(student, teacher)
    return _rkd_terms(s, t, distance=False, angle=True)[1]


def rkd_loss(student: Tensor, teacher: Tensor, w_d: float = 25.0,
             w_a: float = 50.0) -> tuple[Tensor, Tensor, Tensor]:
    r"""Relational KD: :math:`w_d L_{RKD-D} + w_a L_{RKD-A}` (Park et al. 2019; defaults 25 / 50).

    Returns ``(total, distance_term, angle_term)`` (the two terms unweighted, as
    :func:`rkd_distance_loss` and :func:`rkd_angle_loss`), so a caller can log each. A term whose
    weight is 0 is not computed (returned as 0).
    """
    s, t = _check_pair(student, teacher)
    dist, angle = _rkd_terms(s, t, distance=w_d != 0, angle=w_a != 0)
    return w_d * dist + w_a * angle, dist, angle
