"""Pre-emption: SIGTERM (what clusters send before they stop a job) saves a resumable checkpoint.

Lightning turns SIGTERM into ``SIGTERMException`` at the next batch boundary (every rank stops at
the same step under DDP), which would end the process with status 0 as if training had finished.
:class:`Preemption` writes ``interrupted.ckpt`` beside the run's other checkpoints at that point,
and the CLI exits with status 143 (128 + SIGTERM) naming the checkpoint, so a job script or a
scheduler sees the interruption and resumes with ``--ckpt_path``. Under SLURM with Lightning's
``SLURMEnvironment(auto_requeue=True)``, SIGUSR1 saves Lightning's own ``hpc_ckpt_*.ckpt`` and
requeues the job, which restores it automatically.

The interrupted checkpoint resumes mid-epoch, so the rest of that epoch sees its batches in a new
order; ``last.ckpt`` (end of the last finished epoch) resumes the run bit for bit.
"""

from __future__ import annotations

from pathlib import Path

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from kd_lightning.training.term_log import TrainingDiverged

#: the checkpoint written by the last interrupted fit of this process (read by the CLI)
interrupted_checkpoint: Path | None = None


class Preemption(Callback):
    """On SIGTERM during ``fit``, save ``interrupted.ckpt`` in the run's checkpoint folder."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        global interrupted_checkpoint
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        callback = trainer.checkpoint_callback
        # beside the run's checkpoints, else in its log folder (never the working directory
        # when a logger has a folder of its own)
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else \
            Path(trainer.log_dir or trainer.default_root_dir)
        path = folder / "interrupted.ckpt"
        try:
            trainer.save_checkpoint(path, weights_only=False)  # optimizer and loops too
        except TrainingDiverged:  # a diverged state is not worth resuming
            return
        interrupted_checkpoint = path
