"""Neuron selectivity transfer (NST).

Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
arXiv:1707.01219, 2017.

Each channel of a feature map is one sample of a distribution over "where the network looks":
its activation over the ``H x W`` positions, L2-normalised. NST matches the distribution of the
student's channels to the teacher's with the maximum mean discrepancy (MMD), so the channel
counts may differ; the spatial sizes must agree (the larger map is average-pooled to the smaller).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning import KDConfigError
from kd_lightning.losses._checks import (
    as_list,
    check_non_negative,
    check_pairs,
    check_same_batch,
    upcast,
)
from kd_lightning.losses.feature import pool_to_smaller

__all__ = ["polynomial_kernel", "nst_mmd2", "nst_loss"]


def polynomial_kernel(a: Tensor, b: Tensor, degree: int = 2, c: float = 0.0) -> Tensor:
    r"""Batched polynomial kernel :math:`k(x, y) = (x^\top y + c)^d`.

    Args:
        a: ``[B, M, D]``.
        b: ``[B, N, D]``.

    Returns:
        ``[B, M, N]`` with entry ``[n, i, j] = (a[n, i] . b[n, j] + c) ** degree``.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        return (torch.bmm(a, b.transpose(1, 2)) + c).pow(degree)


def _check_kernel(degree: int, c: float) -> None:
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise KDConfigError(f"NST polynomial kernel degree must be an integer >= 1, got {degree!r} "
                            f"(the paper uses d = 2).")
    check_non_negative("NST polynomial kernel offset c", c, "(the paper uses c = 0)")


def nst_mmd2(student: Tensor, teacher: Tensor, degree: int = 2, c: float = 0.0) -> Tensor:
    r"""Squared MMD between the channels of one student map and one teacher map
    (Huang & Wang 2017), averaged over the batch.

    .. math::
        \mathcal{L}_{MMD^2}(F_T, F_S) =
          \frac{1}{C_T^2} \sum_{i, i'} k(f_T^{i}, f_T^{i'})
        + \frac{1}{C_S^2} \sum_{j, j'} k(f_S^{j}, f_S^{j'})
        - \frac{2}{C_T C_S} \sum_{i, j} k(f_T^{i}, f_S^{j})

    with :math:`f^{i} = F^{i\cdot} / \|F^{i\cdot}\|_2` the ``i``-th channel's activations over the
    spatial positions, L2-normalised (a zero channel stays zero), and ``k`` the polynomial kernel
    :math:`(x^\top y + c)^d`. The teacher-teacher term is a constant for the student; it is kept
    so that the value is a true squared MMD (>= 0, and 0 when the maps are equal).

    Args:
        student: ``[B, C_s, L]`` or ``[B, C_s, H, W]``.
        teacher: ``[B, C_t, ...]`` of the same dimensionality (a constant); if the spatial sizes
            differ, the larger map is average-pooled to the smaller one.
        degree, c: the kernel's ``d`` and ``c`` (paper: ``d = 2``, ``c = 0``).
    """
    _check_kernel(degree, c)
    check_same_batch("nst_loss", student, teacher)
    s, t = pool_to_smaller(upcast(student), upcast(teacher.detach()))
    s = F.normalize(s.flatten(2), p=2, dim=2)  # [B, C_s, HW]
    t = F.normalize(t.flatten(2), p=2, dim=2)  # [B, C_t, HW]
    return (polynomial_kernel(t, t, degree, c).mean()
            + polynomial_kernel(s, s, degree, c).mean()
            - 2.0 * polynomial_kernel(s, t, degree, c).mean())


def nst_loss(student_feats: Tensor | Sequence[Tensor], teacher_feats: Tensor | Sequence[Tensor],
             degree: int = 2, c: float = 0.0) -> Tensor:
    r"""NST loss (Huang & Wang 2017) without its weight: the squared MMD
    (:func:`nst_mmd2`) summed over the tapped layer pairs.

    .. math::
        L_{NST} = \sum_{l} \mathcal{L}_{MMD^2}\big(F_T^{(l)}, F_S^{(l)}\big)

    The paper's objective is :math:`H(y, p_S) + \frac{\lambda}{2} \mathcal{L}_{MMD^2}` with the
    polynomial kernel ``d = 2, c = 0`` as its best kernel; the CRD benchmark (and mdistiller)
    multiply this function's value directly by 50 on CIFAR-100, applied to the outputs of the
    residual stages (every tapped map after the stem). For ``d = 2, c = 0`` the squared MMD equals
    :math:`\| F_T^\top F_T / C_T - F_S^\top F_S / C_S \|_F^2` (rows of :math:`F` the normalised
    channels), the distance between the Gram matrices of spatial positions used in style
    transfer, as the paper points out.

    Args:
        student_feats: one ``[B, C_s, ...]`` student map or a sequence (one per pair).
        teacher_feats: the matching teacher maps (constants).
        degree, c: polynomial kernel parameters (``d >= 1`` integer, ``c >= 0``).
    """
    s_list, t_list = as_list(student_feats), as_list(teacher_feats)
    check_pairs("nst_loss", s_list, t_list)
    total = None
    for fs, ft in zip(s_list, t_list):
        term = nst_mmd2(fs, ft, degree, c)
        total = term if total is None else total + term
    return total
