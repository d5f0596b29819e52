"""Label terms on batches with unlabelled rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_lightning.data import UNLABELLED
from kd_lightning.losses import labelled_cross_entropy


def _batch(n=8, k=10, unlabelled=(1, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 40, generator=g)
    y_true = torch.randint(0, k, (n,), generator=g)
    y = y_true.clone()
    y[list(unlabelled)] = UNLABELLED
    return x, y, y_true, torch.arange(n)


# ---- label terms skip unlabelled rows --------------------------------------------------------
def test_labelled_cross_entropy_is_the_mean_over_labelled_rows_with_zero_gradient_elsewhere():
    x, y, _, _ = _batch()
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
