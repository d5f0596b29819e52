"""Learning-rate schedules built from torch's own schedulers.

``LinearWarmupCosineAnnealingLR`` is the schedule lightning-bolts offers under that name
(bolts requires pytorch-lightning < 2), composed here from ``torch.optim``'s own schedulers.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR


class LinearWarmupCosineAnnealingLR(SequentialLR):
    """Linear warm-up from ``warmup_start_factor * lr`` to ``lr`` over ``warmup_epochs``, then
    cosine annealing to ``eta_min`` at ``max_epochs`` (Goyal et al. 2017; Loshchilov & Hutter 2017).

    Counts in scheduler steps: epochs with ``lr_scheduler_interval: epoch`` (the default), or
    optimizer steps with ``lr_scheduler_interval: step``.

    YAML::

        lr_scheduler:
          class_path: kd_lightning.training.LinearWarmupCosineAnnealingLR
          init_args: {warmup_epochs: 5, max_epochs: 100}
    """

    def __init__(self, optimizer: Optimizer, warmup_epochs: int, max_epochs: int,
                 warmup_start_factor: float = 0.01, eta_min: float = 0.0) -> None:
        if not 0 <= warmup_epochs < max_epochs:
            raise ValueError(f"need 0 <= warmup_epochs < max_epochs, got {warmup_epochs}, {max_epochs}")
        warm = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0,
                        total_iters=max(warmup_epochs, 1))
        cosine = CosineAnnealingLR(optimizer, T_max=max_epochs - warmup_epochs, eta_min=eta_min)
        super().__init__(optimizer, [warm, cosine], milestones=[warmup_epochs])
        self.warmup_epochs, self.max_epochs = warmup_epochs, max_epochs
