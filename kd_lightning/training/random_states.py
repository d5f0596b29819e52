"""Every random state of a run in its checkpoints, so that a resumed run continues the same run.

What a run draws at random after its first epoch: the shuffle of the training data (the sampler
draws its permutation from torch's global generator when an epoch's first batch is fetched),
dropout masks, random augmentation, and method-owned draws (e.g. CRD's negatives). All of them come
from the global generators of torch, numpy and Python, so saving those in the checkpoint and
restoring them at the start of the next epoch reproduces the rest of the run: the resumed
student equals the uninterrupted one bit for bit (with ``--trainer.deterministic true``, which
pins the few CPU kernels that are not deterministic by default).

Timing. Checkpoints are written at the end of an epoch (``ModelCheckpoint`` after validation),
and in an uninterrupted run nothing draws a random number between that moment and the start of
the next epoch. A resumed run draws some before that point (model and connector initialisation,
the sanity-check and teacher-cache loaders), so the states are put back in
``on_train_epoch_start`` of the first epoch it trains, after all of those and just before the
training loader is iterated. Under DDP each rank restores the states rank 0 saved: ranks seeded
alike draw alike, and Lightning's ``DistributedSampler`` orders the data by (seed, epoch) anyway.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader

#: the checkpoint key holding the states
CHECKPOINT_KEY = "kd_lightning_rng_states"


def collect_rng_states() -> dict:
    """The global random states of torch (CPU, and CUDA where present), numpy and Python, as
    tensors, numbers and tuples only (so checkpoints still load with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos),
                      int(has_gauss), float(gauss)),
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    """Restore states from :func:`collect_rng_states` (CUDA states only where CUDA is present)."""
    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _loaders(loaders) -> list:
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


class RandomStates(Callback):
    """Saves the global random states with every checkpoint and restores them on resume."""

    def __init__(self) -> None:
        self._pending: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = collect_rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get(CHECKPOINT_KEY)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._pending is None:
            return
        set_rng_states(self._pending)
        self._pending = None
        # In an uninterrupted run each training loader's iterator is created after this hook,
        # and creating it draws the loader's base seed from torch's generator; a resumed run
        # created its iterators before this hook (Lightning sets the loaders up early when
        # restoring). Make that draw now, so the shuffle that follows (drawn at the first fetch)
        # and every later draw see the generator exactly as the uninterrupted run did.
        for loader in _loaders(trainer.train_dataloader):
            if isinstance(loader, DataLoader) and loader.generator is None:
                torch.empty((), dtype=torch.int64).random_()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._pending = None
