"""Knowledge (rule) modules for :class:`~kd_lightning.methods.MutualDistillation`.

A rule maps a batch ``x`` to ``r(x, y)`` in [0, 1] for every class, shape ``[batch, num_classes]``
(optionally with a mask of where it applies). Fixed rules have no parameters; learnable rules
carry ``phi`` as ordinary parameters. See :mod:`kd_lightning.rules.base`.
"""

from kd_lightning.rules.base import Rule, RuleOutputError, evaluate_rule, evaluate_rules
from kd_lightning.rules.mnist1d import (
    MNIST1DLearnableTemplateRule,
    MNIST1DPermutedTemplateRule,
    MNIST1DTemplateRule,
    mnist1d_templates,
    template_placements,
)

__all__ = ["Rule", "RuleOutputError", "evaluate_rule", "evaluate_rules", "MNIST1DTemplateRule",
           "MNIST1DLearnableTemplateRule", "MNIST1DPermutedTemplateRule", "mnist1d_templates",
           "template_placements"]
