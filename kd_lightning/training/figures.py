"""Figures for TensorBoard: what a person would rather look at than read.

:class:`InspectionFigures` (a Lightning callback, attached by the CLI when the logger is a
:class:`~pytorch_lightning.loggers.TensorBoardLogger`) draws, at the end of every
``every_n_epochs``-th validation epoch and of the last epoch, at most about :data:`MAX_DRAWS`
times per fit (a longer fit draws every ``ceil(max_epochs / MAX_DRAWS)``-th epoch instead: a
few-data fit of hundreds of one-step epochs would otherwise spend most of its time drawing):

* the student's validation confusion matrix (``val/confusion_matrix``; torchmetrics
  :class:`~torchmetrics.classification.MulticlassConfusionMatrix`, rows = true class, columns =
  predicted class);
* the method's own figures (``inspect/<name>``), from a fixed handful of validation examples (the
  first of the first validation batch), when the method implements
  ``inspection_figures(batch) -> dict[str, Figure]`` (FSP matrices, attention maps, the rule
  weights and imitation weight of MutualDistillation, ...);

and after ``test`` it writes the run's hyperparameters with the final test metrics
(``test/acc``, ``test/errors``, ...) into TensorBoard's HParams tab, so runs can be compared there.

Figures cost one extra student forward over the validation set, only at the epochs that draw;
the other epochs pay nothing. With any other logger (CSV, MLflow, W&B) the callback does nothing.
Figures are drawn on matplotlib's non-interactive ``Agg`` canvas (no display needed; pyplot's
global backend is left alone, so a notebook keeps its own).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from kd_lightning import KDConfigError
from kd_lightning.training.lightning_compat import defer_tensorboard_hparams

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["InspectionFigures", "attention_maps_figure", "confusion_matrix_figure",
           "matrix_pairs_figure", "new_figure", "tensorboard_logger", "weights_over_time_figure"]


# ---- drawing ----------------------------------------------------------------------------------
def new_figure(width: float, height: float, rows: int = 1, cols: int = 1):
    """``(figure, axes[rows][cols])``: a matplotlib figure on an Agg canvas, made without pyplot
    (no global backend switch, no figure kept alive by pyplot's registry). matplotlib is imported
    here, so runs that draw nothing never load it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def confusion_matrix_figure(matrix: Tensor, class_names: Sequence[str] | None = None,
                            title: str = "validation confusion matrix") -> Figure:
    """A ``[K, K]`` count matrix (rows = true class, columns = predicted class) as a heat map,
    with the counts written in the cells when ``K <= 20``."""
    counts = matrix.detach().cpu().long()
    k = counts.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    size = min(3.0 + 0.45 * k, 14.0)
    fig, axes = new_figure(size, size)
    ax = axes[0, 0]
    image = ax.imshow(counts.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if k <= 20:
        ax.set_xticks(range(k), names, rotation=90 if k > 10 else 0)
        ax.set_yticks(range(k), names)
        high = counts.max().item() / 2
        for i in range(k):
            for j in range(k):
                value = int(counts[i, j])
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                            color="white" if value > high else "black")
    fig.tight_layout()
    return fig


def matrix_pairs_figure(teacher: Sequence[Tensor], student: Sequence[Tensor],
                        names: Sequence[str]) -> Figure:
    """One row per matrix pair: the teacher's matrix, the student's (same colour scale) and
    ``|teacher - student|`` (e.g. FSP matrices, averaged over the shown examples)."""
    rows = len(names)
    fig, axes = new_figure(10.5, 3.3 * rows, rows, 3)
    for row, (t, s, name) in enumerate(zip(teacher, student, names)):
        t, s = t.detach().float().cpu(), s.detach().float().cpu()
        low, high = min(t.min().item(), s.min().item()), max(t.max().item(), s.max().item())
        for col, (m, label, kw) in enumerate(((t, "teacher", {"vmin": low, "vmax": high}),
                                              (s, "student", {"vmin": low, "vmax": high}),
                                              ((t - s).abs(), "|teacher - student|", {}))):
            ax = axes[row, col]
            image = ax.imshow(m.numpy(), cmap="viridis", aspect="auto", **kw)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.set_xlabel("channel of the second map", fontsize=8)
            ax.set_ylabel("channel of the first map", fontsize=8)
    fig.tight_layout()
    return fig


def attention_maps_figure(teacher: Sequence[Tensor], student: Sequence[Tensor],
                          names: Sequence[str], labels: Tensor | None = None) -> Figure:
    """Teacher vs student attention maps, one row per example. ``teacher[j]`` and ``student[j]``
    are the maps of layer ``names[j]``, ``[N, L]`` (1D features: one panel per layer with both
    curves) or ``[N, H, W]`` (images: a teacher and a student panel per layer). Maps are
    L2-normalised per example, as attention transfer compares them."""
    n = teacher[0].shape[0]
    one_d = teacher[0].dim() == 2
    per_layer = 1 if one_d else 2
    cols = per_layer * len(names)
    fig, axes = new_figure(3.2 * cols if one_d else 2.2 * cols, 2.0 * n, n, cols)
    for j, (t, s, name) in enumerate(zip(teacher, student, names)):
        t, s = _l2_normalised(t), _l2_normalised(s)
        for i in range(n):
            suffix = f" (y={int(labels[i])})" if labels is not None else ""
            if one_d:
                ax = axes[i, j]
                ax.plot(t[i].numpy(), label="teacher")
                ax.plot(s[i].numpy(), label="student")
                ax.set_ylim(0, max(t[i].max().item(), s[i].max().item()) * 1.05 + 1e-12)
                ax.set_title(f"{name}{suffix}", fontsize=8)
                ax.tick_params(labelsize=6)
                if i == 0 and j == 0:
                    ax.legend(fontsize=7)
                continue
            for col, (m, who) in enumerate(((t[i], "teacher"), (s[i], "student"))):
                ax = axes[i, 2 * j + col]
                ax.imshow(m.numpy(), cmap="inferno")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{name} {who}{suffix}", fontsize=8)
    fig.tight_layout()
    return fig


def _l2_normalised(maps: Tensor) -> Tensor:
    maps = maps.detach().float().cpu()
    flat = maps.flatten(1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(maps)


def weights_over_time_figure(steps: Sequence[int], series: dict[str, Sequence[float]],
                             title: str, xlabel: str = "training step") -> Figure:
    """Several named curves over training steps on one chart (e.g. every rule weight lambda_l and
    the imitation weight pi), so they can be read against each other."""
    fig, axes = new_figure(6.5, 3.8)
    ax = axes[0, 0]
    for name, values in series.items():
        ax.plot(list(steps), list(values), marker="." if len(steps) < 50 else None, label=name)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---- the callback -----------------------------------------------------------------------------
#: how many times a fit draws its figures at most (plus the last epoch)
MAX_DRAWS = 10


def tensorboard_logger(trainer: pl.Trainer) -> TensorBoardLogger | None:
    """The trainer's TensorBoard logger, or ``None`` when it logs elsewhere (or nowhere)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger
    return None


class InspectionFigures(Callback):
    """Confusion matrix and method figures in TensorBoard at validation, hparams with the test
    metrics after test (see the module docstring).

    Args:
        every_n_epochs: draw at the end of every ``n``-th validation epoch (and of the last
            epoch), at most about :data:`MAX_DRAWS` times per fit; 0 turns the figures off
            (default 10).
        confusion_matrix: draw the validation confusion matrix (default true).
        method_figures: draw the method's ``inspection_figures`` (default true).
        num_examples: how many fixed validation examples the method figures show (default 4).
        test_hparams: after ``test``, write the hyperparameters with the test metrics into the
            HParams tab (default true).
    """

    def __init__(self, every_n_epochs: int = 10, confusion_matrix: bool = True,
                 method_figures: bool = True, num_examples: int = 4, test_hparams: bool = True) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise KDConfigError(f"inspection.every_n_epochs must be an integer >= 0 (0 turns the "
                                f"figures off), got {every_n_epochs!r}.")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise KDConfigError(f"inspection.num_examples must be an integer >= 1, got {num_examples!r}.")
        self.every_n_epochs = every_n_epochs
        self.confusion_matrix = confusion_matrix
        self.method_figures = method_figures
        self.num_examples = num_examples
        self.test_hparams = test_hparams
        self._matrix: MulticlassConfusionMatrix | None = None
        self._examples: tuple[Tensor, ...] | None = None
        self._drawing = False
        self._validation_metrics: dict[str, float] = {}
        self._hparams_written: str | None = None
        #: the counts of the last confusion matrix drawn (rows = true class, columns = predicted)
        self.last_confusion_matrix: Tensor | None = None

    # which validation epochs draw
    def _draws(self, trainer: pl.Trainer) -> bool:
        if self.every_n_epochs == 0 or trainer.sanity_checking or tensorboard_logger(trainer) is None:
            return False
        if trainer.state.fn != "fit":  # `kd-lightning validate`: one validation, drawn
            return trainer.state.fn == "validate"
        epoch, epochs = trainer.current_epoch + 1, trainer.max_epochs or 0
        return epoch % max(self.every_n_epochs, math.ceil(epochs / MAX_DRAWS)) == 0 or epoch == epochs

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._drawing = self._draws(trainer)
        if self._drawing and self.confusion_matrix:
            k = getattr(pl_module, "num_classes", None)
            if self._matrix is None and k:
                self._matrix = MulticlassConfusionMatrix(num_classes=k, ignore_index=-1)
            if self._matrix is not None:
                self._matrix = self._matrix.to(pl_module.device)
                self._matrix.reset()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs,
                                batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._drawing:
            return
        x, y = batch[0], batch[1]
        if self._examples is None and dataloader_idx == 0:
            # the first examples of the (unshuffled) validation set: the same ones every time
            self._examples = tuple(t[: self.num_examples].detach().clone() for t in batch)
        if self._matrix is not None and self.confusion_matrix:
            with torch.no_grad():
                logits = pl_module(x)
            self._matrix.update(logits.float().argmax(-1), y)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._drawing:
            return
        self._drawing = False
        writer = tensorboard_logger(trainer).experiment  # rank 0's writer; a no-op elsewhere
        step = trainer.global_step
        if self._matrix is not None and self.confusion_matrix:
            matrix = self._matrix.compute()  # summed over DDP ranks: every rank calls it
            self._matrix.reset()
            self.last_confusion_matrix = matrix.cpu()
            if trainer.is_global_zero:
                title = f"validation confusion matrix, epoch {trainer.current_epoch}, step {step}"
                writer.add_figure("val/confusion_matrix", confusion_matrix_figure(matrix, title=title),
                                  global_step=step, close=False)
        hook = getattr(pl_module, "inspection_figures", None)
        if self.method_figures and hook is not None and self._examples is not None and trainer.is_global_zero:
            examples = tuple(t.to(pl_module.device) for t in self._examples)
            with torch.no_grad():
                figures = hook(examples) or {}
            for name, fig in figures.items():
                writer.add_figure(f"inspect/{name}", fig, global_step=step, close=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validation_metrics = _scalars(trainer.callback_metrics, ("val/", "hp_metric"))

    # ---- hparams with the final metrics ------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        logger = tensorboard_logger(trainer)
        if self.test_hparams and logger is not None:
            defer_tensorboard_hparams(logger)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write_hparams(trainer, pl_module)

    def write_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the run's hyperparameters with its final metrics into TensorBoard's HParams tab:
        the test metrics after a test (with ``hp_metric``, the last validation accuracy), else
        the last validation metrics. Called after ``test``; the CLI calls it after a ``fit`` that
        is not followed by a test. Once per run: TensorBoard keeps a run's first session."""
        logger = tensorboard_logger(trainer)
        if not self.test_hparams or logger is None or self._hparams_written == logger.log_dir:
            return
        metrics = _scalars(trainer.callback_metrics, ("test/",))
        last_val = self._validation_metrics
        metrics = ({**{k: v for k, v in last_val.items() if k == "hp_metric"}, **metrics}
                   if metrics else last_val)
        if not metrics:
            return
        params = {k: v for k, v in (logger.hparams or pl_module.hparams).items()
                  if not str(k).startswith("_")}  # not Lightning's own `_instantiator`
        logger.log_hyperparams(params, metrics, step=trainer.global_step)
        logger.save()
        self._hparams_written = logger.log_dir


def _scalars(metrics: dict, prefixes: tuple[str, ...]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k.startswith(prefixes) and isinstance(v, Tensor) and v.numel() == 1}
