"""A callback that kills its own process with SIGKILL at a chosen point (resume tests).

``KD_TEST_KILL_AT="epoch:batch"`` (in the environment of the run) names the training batch at
whose start the process gets ``KD_TEST_SIGNAL`` (default SIGKILL: it dies as a machine failure
would kill it, no hook, no checkpoint; SIGTERM: as a cluster pre-empts a job)."""

from __future__ import annotations

import os
import signal

from pytorch_lightning.callbacks import Callback


class KillAt(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        target = os.environ.get("KD_TEST_KILL_AT")
        if target and tuple(map(int, target.split(":"))) == (trainer.current_epoch, batch_idx):
            os.kill(os.getpid(), getattr(signal, os.environ.get("KD_TEST_SIGNAL", "SIGKILL")))
