"""Relation-based distillation: Relational Knowledge Distillation (RKD).

Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068).
Park et al., section 3: :math:`L_R(F_t, F_s) = L(\\phi_t(t_i, t_j), \\phi_s(s_i, s_j))` -- the
student matches the *relations* between examples of a batch, not the teacher's features, so the
two embeddings may have different widths.

Conventions (those of the authors' reference code, which the default weights w_d = 25,
w_a = 50 were tuned for): the Huber loss (smooth-L1, delta = 1) is averaged over all
``N x N`` distance entries and all ``N x N x N`` angle entries of a batch of ``N``; entries with a
repeated example (``i == j`` etc.) are zero on both sides and contribute zero loss. The teacher
side is computed without gradient.

Precision: distances and angles are computed in float64 (float32 on MPS, which has no float64)
with autocast off, from the Gram matrix of the centred batch with equal rows detected exactly
(see :func:`pairwise_distances` for why), and each loss is returned in the embedding's dtype
(float32 for half-precision embeddings, float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
    """float32 for half-precision (autocast) embeddings; float64 stays float64."""
    return e if e.dtype == torch.float64 else e.float()


def _wide(e: Tensor) -> torch.dtype:
    """The dtype the relations are computed in: float64 (float32 on MPS, which has no float64)."""
    return torch.float32 if e.device.type == "mps" else torch.float64


def _equal_rows(e: Tensor) -> Tensor:
    """``[N, N]`` bool, True where rows ``i`` and ``j`` of ``e`` are equal (exact comparison)."""
    _, ids = torch.unique(e.detach(), dim=0, return_inverse=True)
    return ids.unsqueeze(0) == ids.unsqueeze(1)


def _distances(e: Tensor) -> Tensor:
    """``[N, N]`` distances of the rows of ``e`` in the wide dtype (see :func:`pairwise_distances`)."""
    with torch.autocast(device_type=e.device.type, enabled=False):
        ew = e.to(_wide(e))
        # distances are translation invariant, so the batch mean is a constant here (detached:
        # its exact gradient contribution is zero)
        c = ew - ew.mean(dim=0, keepdim=True).detach()
        g = c @ c.t()
        sq = g.diagonal()
        d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * g
        # 0 for equal rows (and a rounding residue <= 0), with a zero gradient: sqrt(0) stays out
        # of the graph; written so that a nan (non-finite embedding) propagates
        zero = _equal_rows(e) | (d2 <= 0)
        return torch.where(zero, torch.zeros_like(d2), torch.where(zero, torch.ones_like(d2), d2).sqrt())


def pairwise_distances(e: Tensor, squared: bool = False) -> Tensor:
    r"""Euclidean distances :math:`\|e_i - e_j\|_2` between the rows of ``e`` (``[N, D]`` -> ``[N, N]``).

    From the Gram matrix of the centred batch, in :math:`O(N^2 D)` without the ``[N, N, D]``
    difference vectors: with :math:`c_i = e_i - \bar e` (the batch mean, subtracted first),
    :math:`\|e_i - e_j\|^2 = \|c_i\|^2 + \|c_j\|^2 - 2 c_i^\top c_j`. Computed in float64 (float32
    on MPS, which has no float64) with autocast off, and returned in ``e``'s dtype (float32 for
    half precision).

    What is exact and why. The Gram identity cancels terms of size :math:`\|c\|^2`, so its
    rounding error is :math:`\sim \epsilon_{mach} (\|c_i\|^2 + \|c_j\|^2)`, whatever the distance.
    (1) Centring makes :math:`\|c\|` the spread of the batch instead of the norm of its rows, so a
    common offset costs no digits. (2) For two *equal* rows the identity returns a rounding
    residue instead of 0 (the matrix product sums :math:`c_i^\top c_i` and :math:`c_i^\top c_j` in
    different orders), which would make the pair look distinct. So equal rows are detected by
    comparing them exactly, and their distance is set to exactly 0: this is the same decision the
    explicit formula makes, because a difference of two floating-point numbers is 0 exactly when
    they are equal (IEEE subtraction with gradual underflow), so :math:`e_i - e_j = 0` if and only
    if the rows are equal. (The comparison sorts the rows with ``torch.unique``: one host-device
    synchronisation per call on a GPU.) Every other pair keeps its Gram value, with a relative
    error of :math:`\sim \epsilon_{mach} \|c\|^2 / d_{ij}^2`, and the gradient at a zero distance
    is 0. The limit: two *distinct* rows closer than about :math:`10^{-7} \|c\|` (float64) get an
    inaccurate distance (0 if the residue is not positive) -- and the cosines at such a pair
    are ill-conditioned in any form, since the direction of a difference of that size is set by
    the rounding of the embeddings themselves.
    """
    d = _distances(e)
    return (d * d if squared else d).to(_upcast(e).dtype)


def _normalised_distances(d: Tensor) -> Tensor:
    r""":math:`\psi_D = d_{ij} / \mu`, :math:`\mu` the mean over the non-zero pairs (``d`` from :func:`_distances`)."""
    # zero entries (i == j and equal rows, exactly 0) add nothing to the sum, so this is the
    # mean over the non-zero pairs (without a host-device synchronisation); the clamps keep an
    # all-zero batch at 0 instead of 0/0
    mu = d.sum() / (d > 0).sum().clamp(min=1)
    return d / mu.clamp(min=torch.finfo(d.dtype).tiny)


def _angles(d: Tensor) -> Tensor:
    r"""Cosines :math:`\psi_A(e_i, e_j, e_k)` of the angle at :math:`e_j` for all triplets, as
    ``[N, N, N]`` indexed ``[j, i, k]`` (``j`` is the vertex), from the distances ``d``
    (:func:`_distances`) by the law of cosines,
    :math:`\langle e_i - e_j, e_k - e_j\rangle = (d_{ij}^2 + d_{jk}^2 - d_{ik}^2) / 2`.
    A zero distance (``i == j``, or equal rows) gives cosine 0, like normalising a zero vector.
    """
    d2 = d * d
    pos = d > 0
    # 1/d where d > 0 and 0 elsewhere, with a finite gradient (the where() keeps 1/0 out of it)
    inv = torch.where(pos, 1.0 / torch.where(pos, d, torch.ones_like(d)), torch.zeros_like(d))
    dot2 = d2.unsqueeze(2) + d2.unsqueeze(1) - d2.unsqueeze(0)  # [j, i, k]: 2 <e_i - e_j, e_k - e_j>
    return dot2 * (0.5 * inv).unsqueeze(2) * inv.unsqueeze(1)


def _huber_mean(student: Tensor, teacher: Tensor) -> Tensor:
    return F.smooth_l1_loss(student, teacher, reduction="mean")


def _rkd_terms(s: Tensor, t: Tensor, distance: bool, angle: bool) -> tuple[Tensor, Tensor]:
    """Unweighted distance and angle terms (0 when not asked for); each side's distances computed once."""
    out_dtype = s.dtype
    zero = s.new_zeros(())
    d_s = _distances(s)
    with torch.no_grad():
        d_t = _distances(t.detach())
    with torch.autocast(device_type=s.device.type, enabled=False):
        dist = _huber_mean(_normalised_distances(d_s), _normalised_distances(d_t)).to(out_dtype) \
            if distance else zero
        ang = _huber_mean(_angles(d_s), _angles(d_t)).to(out_dtype) if angle else zero
    return dist, ang


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Distance-wise RKD (Park et al. 2019, eq. 4-5).

    .. math::
        \psi_D(e_i, e_j) = \frac{1}{\mu} \|e_i - e_j\|_2,\quad
        \mu = \operatorname{mean}_{(i,j):\, \|e_i - e_j\| > 0} \|e_i - e_j\|_2 \\
        L_{RKD-D} = \frac{1}{N^2} \sum_{i,j} \ell_\delta\big(\psi_D(t_i, t_j), \psi_D(s_i, s_j)\big)

    with :math:`\ell_\delta` the Huber loss (smooth-L1, :math:`\delta = 1`). Normalising by
    :math:`\mu` makes the term independent of the scale of each embedding. The distances are
    those of :func:`pairwise_distances`: exactly 0 for equal rows (duplicate examples or
    collapsed features), which therefore do not enter :math:`\mu`, as in the formula.

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

    Computed without the ``[N, N, D]`` difference vectors, in :math:`O(N^2 D + N^3)`: the
    distances :math:`d_{ij}` come from :func:`pairwise_distances` and the inner products from the
    law of cosines, :math:`\langle e_i - e_j, e_k - e_j\rangle = (d_{ij}^2 + d_{jk}^2 - d_{ik}^2)/2`.
    So the decision "zero difference" is exact -- :math:`d_{ij}` is exactly 0 if and only if
    :math:`e_i = e_j`, which is where the formula jumps from a unit vector to 0 -- and every other
    cosine is as accurate as the centred distances it is built from (the law of cosines adds an
    error of about :math:`\epsilon_{mach}(d_{ij}/d_{jk} + d_{jk}/d_{ij})` at most).
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
