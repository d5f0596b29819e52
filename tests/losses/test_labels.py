"""Label terms on batches with unlabelled rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_lightning.data import UNLABELLED
from kd_lightning.losses import labelled_cross_entropy
from tests.conftest import unlabelled_batch


# ---- label terms skip unlabelled rows --------------------------------------------------------
def test_labelled_cross_entropy_is_the_mean_over_labelled_rows_with_zero_gradient_elsewhere():
    x, y, _, _ = unlabelled_batch()
    logits = torch.randn(8, 10, requires_grad=True)
    ce = labelled_cross_entropy(logits, y)
    keep = y != UNLABELLED
    torch.testing.assert_close(ce, F.cross_entropy(logits[keep], y[keep]))
    (grad,) = torch.autograd.grad(ce, logits)
    assert bool((grad[~keep] == 0).all()) and bool((grad[keep] != 0).any())
    # no labelled row: 0 with zero gradient, not nan
    none = torch.full((8,), UNLABELLED)
    ce0 = labelled_cross_entropy(logits, none)
    (grad0,) = torch.autograd.grad(ce0, logits)
    assert ce0.item() == 0.0 and bool((grad0 == 0).all())
