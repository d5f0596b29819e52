"""A stable path to a run's best checkpoint, written once and never replaced.

Teacher configs train into versioned folders (``runs/<name>/version_N/checkpoints/best.ckpt`` and
``last.ckpt``), so a re-run never replaces an earlier teacher. The student configs load the teacher
from one fixed path, ``runs/<name>/checkpoints/best.ckpt``: :class:`PublishBest` copies the best
checkpoint there when a run finishes, if nothing is there yet. A later run leaves the published
teacher in place and says how to publish its own instead (copy it over the stable path), so the
teacher the student configs distil from changes only when the researcher says so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from kd_lightning.training.checkpoint_io import atomic_copy


class PublishBest(Callback):
    """Copy the run's best checkpoint to a stable path when ``fit`` finishes, unless a checkpoint
    is already there.

    Args:
        path: the stable path; ``{save_dir}`` and ``{name}`` are the run logger's, ``{seed}`` the
            run's ``seed_everything``. The default, ``{save_dir}/{name}/checkpoints/best.ckpt``, is
            ``runs/mnist1d_teacher/checkpoints/best.ckpt`` for ``configs/mnist1d/teacher.yaml``,
            beside the run's version folders; a run whose logger is redirected (the study trains
            its teacher in its own cache folder) publishes there and nowhere else.

    Nothing is written for a run that stops early (an error, divergence, SIGTERM, Ctrl-C): only a
    finished run's best checkpoint is published, and the copy is atomic and durable
    (:func:`~kd_lightning.training.checkpoint_io.atomic_copy`: a temporary file synced and renamed
    into place), so the stable path never holds a partial or, after a power cut, an empty file.
    """

    def __init__(self, path: str = "{save_dir}/{name}/checkpoints/best.ckpt") -> None:
        self.path = path
        self.published: Path | None = None  # where this run's checkpoint was copied, if it was

    def stable_path(self, trainer) -> Path:
        logger = trainer.logger
        save_dir = trainer.default_root_dir
        if logger is not None and logger.save_dir is not None:
            save_dir = logger.save_dir
        name = str(logger.name) if logger is not None and logger.name else ""
        seed = os.environ.get("PL_GLOBAL_SEED", "none")  # set by seed_everything
        return Path(self.path.format(save_dir=save_dir, name=name, seed=seed))

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.interrupted or not trainer.is_global_zero:
            return
        best = _best_checkpoint(trainer)
        if best is None:
            return
        target = self.stable_path(trainer)
        if target.exists():
            if target.resolve() != best.resolve():
                print(f"kd-lightning: {target} (the published checkpoint, which other configs "
                      f"load) is kept from an earlier run; this run's best is {best}. To publish "
                      f"this run's instead, copy it there: cp {best} {target}", file=sys.stderr)
            return
        atomic_copy(best, target)
        self.published = target
        print(f"kd-lightning: published {best} as {target}", file=sys.stderr)


def _best_checkpoint(trainer) -> Path | None:
    """The best checkpoint of the run's first monitoring ``ModelCheckpoint`` (else its first)."""
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    ordered = [c for c in callbacks if c.monitor is not None] + callbacks
    for callback in ordered:
        path = callback.best_model_path or callback.last_model_path
        if path and Path(path).is_file():
            return Path(path)
    return None
