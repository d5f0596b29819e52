"""Correlation congruence for knowledge distillation (CC / CCKD).

Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, "Correlation Congruence for Knowledge Distillation",
ICCV 2019 (arXiv:1904.01802).

Beyond matching each example's output (instance congruence, e.g. KD), the student matches the
teacher's correlation between every pair of examples of a batch, measured with a kernel on the
embeddings; the two embeddings may have different widths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning import KDConfigError
from kd_lightning.losses._checks import check_positive, check_same_batch, upcast

__all__ = ["cc_correlation_matrix", "cc_loss"]


def _check(gamma: float, order: int) -> None:
    check_positive("CC kernel gamma", gamma, "(the RBF kernel is exp(-gamma |x - y|^2); 0.4 is "
                   "the usual value)")
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise KDConfigError(f"CC Taylor order P must be an integer >= 1, got {order!r} (P = 0 "
                            f"makes every correlation the same constant; the paper uses P = 2).")


def cc_correlation_matrix(embedding: Tensor, gamma: float = 0.4, order: int = 2,
                          normalize: bool = True) -> Tensor:
    r"""Correlation matrix of CCKD with the Taylor-approximated Gaussian RBF kernel
    (Peng et al., ICCV 2019).

    .. math::
        k(F_i, F_j) = e^{-\gamma \|F_i - F_j\|^2}
          \approx \sum_{p=0}^{P} e^{-2\gamma} \frac{(2\gamma)^p}{p!} (F_i^\top F_j)^p

    The expansion is exact as :math:`P \to \infty` for unit-norm embeddings
    (:math:`\|F_i - F_j\|^2 = 2 - 2 F_i^\top F_j`), so by default each row is L2-normalised
    first (``normalize=False`` applies the expansion to the raw rows, as torchdistill does on
    the output of its linear embedding).

    Args:
        embedding: ``[B, ...]`` (flattened to ``[B, D]``).
        gamma: kernel width :math:`\gamma > 0`.
        order: Taylor order :math:`P \ge 1` (default 2).
        normalize: L2-normalise each row first.

    Returns:
        ``[B, B]``.
    """
    _check(gamma, order)
    x = upcast(embedding).reshape(embedding.shape[0], -1)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if normalize:
            x = F.normalize(x, p=2, dim=1)
        dot = x @ x.t()
        corr = torch.ones_like(dot)
        for p in range(1, order + 1):
            corr = corr + (2.0 * gamma) ** p / math.factorial(p) * dot.pow(p)
        return math.exp(-2.0 * gamma) * corr


def cc_loss(student: Tensor, teacher: Tensor, gamma: float = 0.4, order: int = 2,
            normalize: bool = True) -> Tensor:
    r"""Correlation-congruence loss (Peng et al., ICCV 2019), without its weight.

    .. math::
        L_{CC} = \frac{1}{n^2} \big\| \psi(F_t) - \psi(F_s) \big\|_2^2
               = \frac{1}{n^2} \sum_{i, j} \big( k(f^s_i, f^s_j) - k(f^t_i, f^t_j) \big)^2

    with :math:`\psi` the ``n x n`` correlation matrix of a batch (:func:`cc_correlation_matrix`)
    -- the squared Frobenius distance as in the paper's equation (torchdistill's
    ``CCKDLoss`` uses the unsquared distance :math:`\|\cdot\|_2 / n^2`; the CRD benchmark's
    "CC" is a different formula altogether, so its weight 0.02 does not carry over).

    The paper's objective is :math:`\alpha L_{CE} + (1 - \alpha) L_{KD} + \beta L_{CC}`; public
    implementations apply :math:`L_{CC}` to the output of a trainable linear embedding on top of
    each network's penultimate features. The kernel parameters default to :math:`\gamma = 0.4, P = 2` (the setting
    torchdistill ships for CCKD); :math:`\beta` depends on the embedding scale and is for the
    caller to set.

    Args:
        student: ``[n, ...]`` student embedding (flattened to ``[n, D_s]``).
        teacher: ``[n, ...]`` teacher embedding (any width; a constant).
        gamma, order, normalize: see :func:`cc_correlation_matrix`.
    """
    check_same_batch("cc_loss", student, teacher)
    n = student.shape[0]
    c_s = cc_correlation_matrix(student, gamma, order, normalize)
    c_t = cc_correlation_matrix(teacher.detach(), gamma, order, normalize)
    return (c_t - c_s).pow(2).sum() / (n * n)
