r"""The knowledge (rule) interface of mutual distillation (Hu et al. 2016).

A rule is an ``nn.Module`` that scores every class of every example:

.. math:: r_l(x, y) \in [0, 1], \qquad f_l(x, y) = r_l(x, y) - 1 \le 0

returned as a tensor of shape ``[batch, num_classes]`` (1 = the class satisfies the rule fully,
0 = it violates it fully). Hu et al., "Harnessing Deep Neural Networks with Logic Rules" (ACL
2016) use fixed rules (no parameters); "Deep Neural Networks with Massive Learned Knowledge"
(EMNLP 2016) add learnable knowledge modules whose parameters ``phi`` are ordinary
``nn.Parameter`` objects of the rule module, so a learnable rule is just a rule with parameters.

A rule may also say where it applies: ``forward`` then returns ``(r, mask)`` with ``mask`` a
boolean tensor of shape ``[batch]`` (or ``[batch, num_classes]``). Where the mask is false the
rule makes no claim, which is ``r = 1`` for every class (``f = 0``): it leaves the teacher, the
rule weight's gradient and the rule's own update untouched there.

A rule may also split off what it computes from ``x`` alone, independent of its parameters
``phi`` (:meth:`Rule.example_features`): such features never change during training, so
:class:`~kd_lightning.methods.MutualDistillation` computes them once per training example and
passes them back (``forward(x, features=...)``), which spares a learnable rule that part of its
work on every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kd_lightning import KDConfigError

#: a rule's value may overshoot [0, 1] by this much (float rounding); it is then clamped
RANGE_TOLERANCE = 1e-5


class RuleOutputError(KDConfigError):
    """A rule returned something that is not ``r`` in [0, 1] of shape ``[batch, num_classes]``."""


class Rule(nn.Module):
    """Base class of knowledge modules: ``forward(x)`` returns ``r`` of shape ``[B, K]`` in [0, 1].

    Subclasses implement :meth:`forward` and may return ``(r, mask)`` (see the module docstring).
    A rule with trainable parameters is learnable: :class:`~kd_lightning.methods.MutualDistillation`
    updates them (``phi``) with Eq. 5 of Hu et al. (EMNLP 2016) unless ``learn_phi`` is false.

    Args:
        name: shown in error messages (default: the class name).
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.rule_name = name or type(self).__name__

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def example_features(self, x: Tensor) -> Tensor | None:
        """What the rule computes from ``x`` alone, independent of its parameters: a tensor of
        shape ``[B, ...]`` that :meth:`forward` accepts back as ``forward(x, features=...)`` with
        the same result, or ``None`` (default: nothing to precompute). A rule that returns features
        must compute them the same way with and without them, so a cached run and an uncached run
        give the same values."""
        return None

    def fit_to_labelled(self, x: Tensor, y: Tensor) -> None:
        """Set the rule's constants from the run's labelled training examples (called once by
        :class:`~kd_lightning.methods.MutualDistillation` at the start of training, so a
        few-data run never sees labels beyond its own ``M``). Default: nothing to fit."""

    @property
    def learnable(self) -> bool:
        """True when the rule has parameters that require gradient (``phi``)."""
        return any(p.requires_grad for p in self.parameters())


def rule_label(rule: nn.Module, index: int) -> str:
    """How error messages name rule number ``index``."""
    name = getattr(rule, "rule_name", None) or type(rule).__name__
    return f"rule {index} ({name})"


def evaluate_rule(rule: nn.Module, x: Tensor, num_classes: int, index: int = 0,
                  check: bool = True, features: Tensor | None = None) -> Tensor:
    """``r`` of one rule on a batch, ``[B, K]`` in [0, 1], with its mask applied (``r = 1``
    where the rule does not apply).

    With ``check`` the shape is verified and the values must lie in [0, 1] (up to
    :data:`RANGE_TOLERANCE`, then clamped) and be finite; otherwise :class:`RuleOutputError`
    names the rule and the shape it returned. The value check reads one boolean back from the
    device. ``features``: the rule's :meth:`Rule.example_features` of ``x``, passed on to it
    (computed by the rule when ``None``).
    """
    out = rule(x) if features is None else rule(x, features=features)
    mask = None
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise RuleOutputError(
                f"{rule_label(rule, index)} returned a {type(out).__name__} of {len(out)} items; "
                f"a rule returns r of shape [batch, num_classes] or a pair (r, mask).")
        out, mask = out
    batch = x.shape[0]
    expected = (batch, num_classes)
    if not isinstance(out, Tensor):
        raise RuleOutputError(f"{rule_label(rule, index)} returned {type(out).__name__}, expected a "
                              f"tensor r of shape [batch, num_classes] = {expected}.")
    if check and tuple(out.shape) != expected:
        raise RuleOutputError(
            f"{rule_label(rule, index)} returned r of shape {tuple(out.shape)}; expected "
            f"[batch, num_classes] = {expected} (one value in [0, 1] per example and class).")
    if mask is not None:
        mask = mask.to(torch.bool)
        if mask.dim() == 1:
            mask = mask[:, None]
        if check and (mask.shape[0] != batch or mask.shape[1] not in (1, num_classes) or mask.dim() != 2):
            raise RuleOutputError(
                f"{rule_label(rule, index)} returned a mask of shape {tuple(mask.shape)}; expected "
                f"[batch] = ({batch},) or [batch, num_classes] = {expected}.")
    if check:
        r_detached = out.detach()
        bad = (~torch.isfinite(r_detached) | (r_detached < -RANGE_TOLERANCE)
               | (r_detached > 1 + RANGE_TOLERANCE))
        if mask is not None:
            bad = bad & mask
        if bool(bad.any()):
            lo, hi = float(r_detached.min()), float(r_detached.max())
            raise RuleOutputError(
                f"{rule_label(rule, index)} returned r of shape {tuple(out.shape)} with values "
                f"outside [0, 1] (min {lo:g}, max {hi:g}); a rule's output r(x, y) must be a degree "
                f"of truth in [0, 1] (f = r - 1 <= 0), e.g. a softmax or sigmoid.")
    out = out.float().clamp(0.0, 1.0)
    if mask is not None:
        out = torch.where(mask, out, torch.ones_like(out))
    return out


def evaluate_rules(rules: Sequence[nn.Module], x: Tensor, num_classes: int,
                   check: bool = True, features: Sequence[Tensor | None] | None = None) -> Tensor:
    """All rules on a batch, stacked: ``[L, B, K]`` (see :func:`evaluate_rule`); ``features``,
    when given, has one entry per rule (``None`` where the rule computes its own)."""
    features = features if features is not None else [None] * len(rules)
    return torch.stack([evaluate_rule(rule, x, num_classes, i, check, f)
                        for i, (rule, f) in enumerate(zip(rules, features))])


__all__ = ["Rule", "RuleOutputError", "evaluate_rule", "evaluate_rules", "rule_label"]
