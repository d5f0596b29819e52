r"""Mutual distillation with knowledge (rules) as the teacher.

Hu, Ma, Liu, Hovy & Xing, "Harnessing Deep Neural Networks with Logic Rules", ACL 2016, and
Hu, Yang, Salakhutdinov & Xing, "Deep Neural Networks with Massive Learned Knowledge", EMNLP 2016.
Notation: ``p = p_theta(y|x)`` the student, ``r_l(x, y)`` in [0, 1] the rules
(``f_l = r_l - 1``), ``lambda_l >= 0`` their weights, ``C >= 0`` the regularisation strength,
``q`` the teacher.

Shapes: logits ``[B, K]``, rule values ``[L, B, K]`` (a single ``[B, K]`` is taken as ``L = 1``),
rule weights ``[L]``, targets ``[B]`` (class indices). Everything is computed in float32.

Unlabelled examples (``targets == -1``, :data:`~kd_lightning.losses.UNLABELLED`): ``q`` needs no
label, so every term built from ``q`` alone uses them; every term built from the label ``y``
averages over the labelled rows only (and is 0 on a batch without one). Per function: the student's
cross-entropy skips them and its soft term ``l(q, p)`` uses them (:func:`mutual_student_loss`); the
rule-weight objective is about the labels, so it skips them (:func:`rule_weight_loss`); the
knowledge objective's label part skips them and its ``E_q[h]`` part uses them
(:func:`knowledge_loss`).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.labels import labelled_cross_entropy, labelled_mean, labelled_nll, mixed
from kd_lightning.losses.response import soft_cross_entropy


def _as_rule_stack(rule_values: Tensor) -> Tensor:
    if rule_values.dim() == 2:
        return rule_values.unsqueeze(0)
    if rule_values.dim() != 3:
        raise ValueError(f"rule values must be [L, B, K] (or [B, K] for one rule), got shape "
                         f"{tuple(rule_values.shape)}")
    return rule_values


def rule_regularized_teacher(student_logits: Tensor, rule_values: Tensor, rule_weights: Tensor,
                             C: float) -> Tensor:
    r"""The teacher ``q``: the student projected onto the rule constraints, in log space.

    .. math::
        \log q(y|x) = \log p_\theta(y|x) + C \sum_l \lambda_l \big(r_l(x, y) - 1\big) - \log Z(x)

    (Hu et al. 2016, Eq. 2 in the paper's numbering: ``q* ∝ p_theta exp{C sum_l lambda_l f_l}``,
    the closed-form solution of the posterior-regularisation projection of ``p_theta`` onto the
    rule constraints). ``Z(x)`` normalises
    over classes per example; it is taken with ``log_softmax``, so large ``C * lambda`` is stable.
    With ``C = 0`` (or all ``lambda = 0``, or rules that are 1 everywhere) ``q = p``.

    Gradients flow to every input that requires them; detach ``q`` where it is a target.

    Args:
        student_logits: ``[B, K]`` logits of ``p_theta``.
        rule_values: ``[L, B, K]`` rule outputs ``r_l(x, y)`` in [0, 1].
        rule_weights: ``[L]`` weights ``lambda_l >= 0``.
        C: regularisation strength ``C >= 0``.

    Returns:
        ``[B, K]`` ``log q`` (rows log-normalised).
    """
    if not C >= 0:
        raise ValueError(f"C must be >= 0, got {C}")
    r = _as_rule_stack(rule_values).float()
    lam = rule_weights.float().reshape(-1, 1, 1)
    if lam.shape[0] != r.shape[0]:
        raise ValueError(f"{r.shape[0]} rules but {lam.shape[0]} rule weights")
    penalty = C * (lam * (r - 1.0)).sum(0)
    return F.log_softmax(F.log_softmax(student_logits.float(), dim=-1) + penalty, dim=-1)


def mutual_student_loss(student_logits: Tensor, targets: Tensor, teacher_probs: Tensor,
                        pi: float, label_loss: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    r"""Student objective (Hu et al. 2016, Eq. 3 in the paper's numbering):

    .. math:: L(\theta) = (1 - \pi)\, \ell(y, p_\theta) + \pi\, \ell(q, p_\theta)

    with ``l`` the cross-entropy (hard labels, then the soft teacher ``q``, a constant target).
    ``label_loss`` replaces the first term's ``l(y, p)`` when given (e.g. Hinton's
    :func:`~kd_lightning.losses.response_kd_loss` when a network teacher joins the rules).

    The first term averages over the labelled rows (``targets != -1``), the second over every
    row: ``q`` needs no label.

    Returns ``(total, ce, soft)`` so a caller can log each term (``ce`` is always ``l(y, p)``).
    """
    if not 0.0 <= pi <= 1.0:
        raise ValueError(f"pi must be in [0, 1], got {pi}")
    ce = labelled_cross_entropy(student_logits, targets)
    soft = soft_cross_entropy(student_logits, teacher_probs)
    first = ce if label_loss is None else label_loss
    return (1.0 - pi) * first + pi * soft, ce, soft


#: the objectives of the rule weights :func:`rule_weight_loss` offers
LAMBDA_OBJECTIVES = ("mean_q", "mean_log_q")


def rule_weight_loss(student_logits: Tensor, rule_values: Tensor, rule_weights: Tensor,
                     targets: Tensor, C: float, objective: str = "mean_q") -> Tensor:
    r"""Rule-weight objective (Hu, Yang, Salakhutdinov & Xing, "Deep Neural Networks with Massive
    Learned Knowledge", EMNLP 2016, Eq. 6), a loss over ``lambda``.

    ``objective="mean_q"`` (default; Eq. 6 as the paper writes it: ``lambda`` maximises the mean
    probability the teacher gives the true labels):

    .. math::
        L(\lambda) = -\frac{1}{N} \sum_n q_\lambda(y_n | x_n), \qquad
        \frac{\partial L}{\partial \lambda_l} = -\frac{C}{N} \sum_n q_\lambda(y_n | x_n)
        \big(r_l(x_n, y_n) - \mathbb{E}_{q_\lambda}[r_l(x_n, \cdot)]\big)

    ``objective="mean_log_q"``: the mean negative log-likelihood of the labels instead,

    .. math::
        L(\lambda) = -\frac{1}{N} \sum_n \log q_\lambda(y_n | x_n), \qquad
        \frac{\partial L}{\partial \lambda_l} = -\frac{C}{N} \sum_n
        \big(r_l(x_n, y_n) - \mathbb{E}_{q_\lambda}[r_l(x_n, \cdot)]\big)

    The two have the same maximiser for a single example but not for the average: the mean of
    ``q`` is bounded, so an example the rules get wrong can cost at most its ``q(y_n)``, and the
    weights follow the examples the rules get right (each example's gradient is weighted by its
    ``q(y_n)``); the log-likelihood is unbounded below, so a few examples the rules contradict
    with confidence hold ``lambda`` down. ``mean_log_q`` is the form of a maximum-likelihood fit
    of ``lambda`` (a proper scoring rule, the calibrated choice when the teacher's probabilities
    themselves matter); ``mean_q`` is the paper's.

    ``q_lambda`` is the teacher of :func:`rule_regularized_teacher` built with weights
    ``lambda``; ``p`` and ``r`` are treated as constants, so only ``lambda`` receives a gradient.
    Keeping ``lambda >= 0`` is the optimiser's job (see
    :class:`~kd_lightning.methods.MutualDistillation`). The sum runs over the labelled rows
    (``targets != -1``) only: it is about the labels; 0 on a batch without a labelled row.
    Computed in float32.
    """
    if objective not in LAMBDA_OBJECTIVES:
        raise ValueError(f"objective must be one of {LAMBDA_OBJECTIVES}, got {objective!r}")
    log_q = rule_regularized_teacher(student_logits.detach(), _as_rule_stack(rule_values).detach(),
                                     rule_weights, C)
    if objective == "mean_log_q":
        return labelled_nll(log_q, targets)
    return mixed(lambda t: -labelled_mean(log_q.gather(-1, t.clamp_min(0)[:, None])[:, 0].exp(), t),
                 targets)


def knowledge_loss(rule_values: Tensor, targets: Tensor, teacher_probs: Tensor, pi_prime: float,
                   objective: str = "r") -> Tensor:
    r"""Knowledge-module objective (Hu et al., EMNLP 2016, Eq. 5), a loss over ``phi``:

    .. math::
        L(\phi) = -\frac{1}{N} \sum_n \sum_l \Big[(1 - \pi')\, h_{\phi,l}(x_n, y_n)
                  + \pi'\, \mathbb{E}_{q(y)}\big[h_{\phi,l}(x_n, y)\big]\Big]

    The rules learn from the true labels (weight ``1 - pi'``) and from the teacher ``q`` (weight
    ``pi'``; ``q`` is a constant target). ``h`` is the rule's truth value:

    * ``objective="r"``: ``h = r`` (equivalently ``f = r - 1``; the paper's form). Bounded, so
      an example the rule gets confidently wrong contributes little gradient.
    * ``objective="log_r"``: ``h = log r`` (clamped at ``log 1e-12``), the log-likelihood form:
      for a softmax rule it is the cross-entropy of the rule against the mixed target
      ``(1 - pi') onehot(y) + pi' q``.

    With unlabelled rows (``targets == -1``) the label part averages over the labelled rows and
    the ``E_q`` part over every row: ``-(1 - pi') mean_{n labelled} sum_l h_l(x_n, y_n)
    - pi' mean_n sum_l E_q[h_l(x_n, .)]`` (the formula above when every row is labelled).
    """
    if not 0.0 <= pi_prime <= 1.0:
        raise ValueError(f"pi_prime must be in [0, 1], got {pi_prime}")
    if objective not in ("r", "log_r"):
        raise ValueError(f"objective must be 'r' or 'log_r', got {objective!r}")
    r = _as_rule_stack(rule_values).float()
    h = r if objective == "r" else r.clamp_min(1e-12).log()
    onehot = F.one_hot(targets.clamp_min(0), r.shape[-1]).to(h.dtype)  # rows of -1 masked below
    label_part = labelled_mean((h * onehot).sum(-1).sum(0), targets)
    teacher_part = (h * teacher_probs.detach().float()).sum(-1).sum(0).mean()
    return -((1.0 - pi_prime) * label_part + pi_prime * teacher_part)


def imitation_weight(t: float, pi_0: float, alpha: float) -> float:
    r"""Imitation schedule ``pi_t = min(pi_0, 1 - alpha^t)`` (Hu et al., ACL 2016): the student
    starts on the labels alone (``pi = 0`` at ``t = 0``) and moves towards the teacher as training
    goes on, up to ``pi_0``. ``t`` counts epochs (fractional values interpolate within one)."""
    return min(pi_0, 1.0 - math.pow(alpha, max(t, 0.0)))


__all__ = ["rule_regularized_teacher", "mutual_student_loss", "rule_weight_loss", "knowledge_loss",
           "imitation_weight", "LAMBDA_OBJECTIVES"]
