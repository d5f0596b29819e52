r"""Shared machinery of the feature-based methods (FitNet, FSP, ActivationBoundary, AttentionTransfer).

What the four methods have in common lives here, so each method file holds only its
hyperparameters and its ``training_step``:

- tapping intermediate features of the student (with gradient) with
  :class:`~kd_lightning.models.FeatureTaps` for one forward pass at a time (the student's hooks
  exist only during that pass, so validation, test and prediction run the bare student), and of
  the frozen teacher through the base class (:meth:`~DistillationModule.tap_teacher`,
  :meth:`~DistillationModule.teacher_forward`: no gradient, eval mode, and per-example caching of
  the teacher's features when the training inputs are deterministic);
- learning the feature shapes with one dummy forward pass of both networks, to check the tapped
  layers and to build connectors (:mod:`kd_lightning.models.connectors`);
- the task loss: :math:`w_{ce}\,CE + w_{kd}\,KD` (cross-entropy, plus Hinton KD when ``kd_weight > 0``);
- for two-stage methods, the stage, derived from ``current_epoch`` and ``stage1_epochs`` and
  never stored, so a run resumed from a checkpoint lands in the stage it was in.

Where the shapes come from (and why connectors work with the optimizer and with resuming):
connectors must exist before ``configure_optimizers`` and before a checkpoint's ``state_dict`` is
loaded. With ``input_shape`` set (e.g. ``[1, 40]`` for MNIST-1D, ``[3, 32, 32]`` for CIFAR) they
are built in ``__init__``; without it they are built in ``setup()`` from the data module's
``input_shape``, which Lightning calls before it restores a checkpoint and before it creates the
optimizer. Either way the shape is then stored in ``hparams.input_shape``, so
``Method.load_from_checkpoint(path)`` rebuilds the connectors in ``__init__`` and loads them.

Under DDP, the layers a stage does not use get no gradient (the student's head in a transfer-only
stage 1, the connectors in stage 2): use ``--trainer.strategy ddp_find_unused_parameters_true``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kd_lightning import KDConfigError
from kd_lightning.losses import response_terms
from kd_lightning.methods.base import DistillationModule, Losses
from kd_lightning.methods.checks import check_temperature, check_weights
from kd_lightning.models.connectors import build_connector
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.training.epochs import check_epochs, resolve_epochs

Shape = tuple[int, ...]


def describe(shape: Sequence[int]) -> str:
    """``(64, 19)`` -> ``'[B, 64, 19]'``: a feature's shape as the user sees it."""
    return "[" + ", ".join(["B", *map(str, shape)]) + "]"


def paired_layers(method: str, student_layers: Sequence[str],
                  teacher_layers: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """``(student_layers, teacher_layers)`` as lists, the teacher's defaulting to the student's
    paths; an error unless there is exactly one teacher layer per (non-empty) student layer."""
    teacher = list(student_layers) if teacher_layers is None else list(teacher_layers)
    if not student_layers or len(teacher) != len(student_layers):
        raise KDConfigError(
            f"{method} needs one teacher layer per student layer, got student_layers="
            f"{list(student_layers)} and teacher_layers={teacher}.")
    return list(student_layers), teacher


def is_map(shape: Sequence[int]) -> bool:
    """True for a per-example shape ``(C, L)`` or ``(C, H, W)``."""
    return len(shape) in (2, 3)


class FeatureDistillation(DistillationModule):
    """Base class of methods that distil intermediate features of the teacher.

    Args:
        ce_weight: weight of the cross-entropy with the labels in the task loss (default 1).
        kd_weight: weight of Hinton's soft-target term in the task loss (default 0: none).
        temperature: KD temperature ``T`` (used when ``kd_weight > 0``; default 4).
        transfer_weight: weight of the method's transfer term next to the task loss.
        input_shape: per-example input shape, e.g. ``[1, 40]`` or ``[3, 32, 32]``. Optional: by
            default it is taken from the data module at ``setup``.
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule`.
    """

    requires_teacher = True

    def __init__(self, ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0,
                 transfer_weight: float = 1.0, input_shape: list[int] | None = None, **kwargs) -> None:
        name = type(self).__name__
        check_weights(name, ce_weight=ce_weight, kd_weight=kd_weight, transfer_weight=transfer_weight)
        check_temperature(name, temperature)
        if input_shape is not None and (len(input_shape) == 0 or any(int(d) < 1 for d in input_shape)):
            raise KDConfigError(f"input_shape must list the positive sizes of one example, e.g. "
                                f"[1, 40] or [3, 32, 32], got {input_shape}.")
        super().__init__(**kwargs)
        self.ce_weight, self.kd_weight, self.temperature = ce_weight, kd_weight, temperature
        self.transfer_weight = transfer_weight
        self.input_shape: Shape | None = tuple(int(d) for d in input_shape) if input_shape else None
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []
        self.pre_activation = False
        self._features_built = False

    # ---- layers, shapes, connectors -------------------------------------------------------
    def init_features(self, student_layers: Sequence[str], teacher_layers: Sequence[str],
                      pre_activation: bool = False) -> None:
        """Register the tapped layers (called by a subclass's ``__init__``).

        Unknown module paths fail here, with the nearest module names. If ``input_shape`` is
        known, the shapes are checked and connectors built now, else in ``setup``.
        """
        self.student_layers, self.teacher_layers = list(student_layers), list(teacher_layers)
        self.pre_activation = pre_activation
        FeatureTaps(self.student, self.student_layers, pre_activation).remove()  # paths exist?
        # the teacher's taps stay on (they cost a reference per forward); the base class caches
        # the tapped teacher features with its logits when the inputs are deterministic
        self._teacher_feature_taps = self.tap_teacher(self.teacher_layers, pre_activation)
        if self.input_shape is not None:
            self._build_features(self.input_shape)

    def build_features(self, student_shapes: list[Shape], teacher_shapes: list[Shape]) -> None:
        """Check the per-example shapes of the tapped features and build connectors.

        Called once, with the shapes (no batch dimension) of ``student_layers`` and
        ``teacher_layers``. Subclasses raise :class:`KDConfigError` for unusable layers.
        """

    @torch.no_grad()
    def probe_shapes(self, input_shape: Sequence[int]) -> tuple[list[Shape], list[Shape]]:
        """Per-example shapes of the tapped features, from one forward pass of two zero inputs."""
        x = torch.zeros(2, *input_shape, device=self.device)
        shapes = []
        for net in (self.student, self.teacher):
            was_training = net.training
            net.eval()
            try:
                if net is self.student:
                    with FeatureTaps(net, self.student_layers, self.pre_activation) as taps:
                        net(x)
                        feats = taps.pop()
                else:
                    net(x)
                    feats = self._teacher_feature_taps.pop()
                shapes.append([tuple(f.shape[1:]) for f in feats])
            except KDConfigError:
                raise
            except Exception as err:  # noqa: BLE001 - re-raised with context
                raise KDConfigError(
                    f"the {'student' if net is self.student else 'teacher'} ({type(net).__name__}) "
                    f"cannot process inputs of shape {describe(input_shape)}: {err}. Set "
                    f"model.init_args.input_shape to the data's example shape, e.g. [1, 40] for "
                    f"MNIST-1D or [3, 32, 32] for CIFAR.") from None
            finally:
                net.train(was_training)
        return shapes[0], shapes[1]

    def _build_features(self, input_shape: Sequence[int]) -> None:
        student_shapes, teacher_shapes = self.probe_shapes(input_shape)
        self.build_features(student_shapes, teacher_shapes)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.hparams["input_shape"] = list(self.input_shape)  # so load_from_checkpoint rebuilds
        self._features_built = True

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        data_shape = getattr(dm, "input_shape", None)
        if data_shape is not None and self.input_shape is not None and \
                tuple(data_shape) != self.input_shape:
            raise KDConfigError(
                f"model.init_args.input_shape is {list(self.input_shape)} but the data module "
                f"gives examples of shape {list(data_shape)}. Remove input_shape (it is then taken "
                f"from the data) or set it to {list(data_shape)}.")
        if not self._features_built:
            if data_shape is None:
                raise KDConfigError(
                    f"{type(self).__name__} needs the input shape to learn the tapped features' "
                    f"shapes: set model.init_args.input_shape (e.g. [1, 40] for MNIST-1D, "
                    f"[3, 32, 32] for CIFAR) or train with a DistillDataModule.")
            self._build_features(data_shape)

    # ---- forward passes with taps ---------------------------------------------------------
    def student_forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Student logits and its tapped features (with gradient)."""
        with FeatureTaps(self.student, self.student_layers, self.pre_activation) as taps:
            logits = self.student(x)
            return logits, taps.pop()

    def build_connectors(self, student_shapes: list[Shape], teacher_shapes: list[Shape],
                         method: str) -> None:
        """One connector per tapped layer pair into ``self.connectors`` (student -> teacher shape)."""
        for s_path, t_path, s, t in zip(self.student_layers, self.teacher_layers, student_shapes,
                                        teacher_shapes):
            try:
                self.connectors.append(build_connector(s, t))
            except KDConfigError as err:
                raise KDConfigError(f"{method} layer pair student '{s_path}' -> teacher "
                                    f"'{t_path}': {err}") from None

    def task_terms(self, logits: Tensor, y: Tensor, x: Tensor, index: Tensor | None,
                   teacher_logits: Tensor | None = None) -> dict[str, Tensor]:
        """The weighted task terms: ``loss_ce`` and, with ``kd_weight > 0``, ``loss_kd``."""
        if self.kd_weight > 0 and teacher_logits is None:
            teacher_logits = self.teacher_logits(x, index)
        return response_terms(logits, y, teacher_logits if self.kd_weight > 0 else None,
                              self.temperature, self.ce_weight, self.kd_weight)

    def transfer_loss(self, feats: list[Tensor], t_feats: list[Tensor]) -> tuple[str, Tensor]:
        """The method's transfer term from student and teacher features: ``(name, value)``,
        unweighted."""
        raise NotImplementedError

    def compute_losses(self, x, y, index):
        """Task terms + ``transfer_weight`` x the transfer term, in every step."""
        logits, feats = self.student_forward(x)
        t_logits, t_feats = self.teacher_forward(x, index)
        name, transfer = self.transfer_loss(feats, t_feats)
        terms = self.task_terms(logits, y, x, index, t_logits)
        terms[name] = self.transfer_weight * transfer
        return Losses(logits, terms)


class TwoStageFeatureDistillation(FeatureDistillation):
    """A feature method trained in two stages (Romero et al. 2015; Yim et al. 2017; Heo et al. 2019).

    Stage 1 (epochs ``0 .. stage1_epochs - 1``): the transfer loss only. Stage 2 (the remaining
    epochs): the task loss only. With ``stage1_epochs = 0`` the method is single-stage: the task
    loss plus the weighted transfer loss in every epoch. The stage is a function of
    ``current_epoch`` (so resuming from a checkpoint continues in the right stage) and is logged
    as ``stage`` once per epoch.

    Args:
        stage1_epochs: the length of stage 1, an ``int`` number of epochs, or a ``float`` in
            ``[0, 1)``: that fraction of ``trainer.max_epochs``, rounded (so a config keeps its
            proportions when ``--trainer.max_epochs`` changes; a fraction that rounds to 0 gives a
            single-stage run). Must leave at least one epoch for stage 2.
    """

    def __init__(self, stage1_epochs: int | float = 0, **kwargs) -> None:
        check_epochs(stage1_epochs, "stage1_epochs", type(self).__name__)
        super().__init__(**kwargs)
        self.stage1_epochs = stage1_epochs

    def resolved_stage1_epochs(self) -> int:
        """``stage1_epochs`` in epochs (a fraction of ``trainer.max_epochs``, rounded)."""
        trainer = self.trainer_or_none
        if trainer is None and isinstance(self.stage1_epochs, float):
            return 1 if self.stage1_epochs > 0 else 0  # outside a Trainer: epoch 0 is in stage 1
        return resolve_epochs(self.stage1_epochs, getattr(trainer, "max_epochs", None),
                              "stage1_epochs", type(self).__name__)

    def compute_losses(self, x, y, index):
        if not self.single_stage:
            if self.stage == 1:  # the transfer loss only
                logits, feats = self.student_forward(x)
                name, transfer = self.transfer_loss(feats, self.teacher_forward(x, index)[1])
                return Losses(logits, {name: transfer})
            logits = self.student(x)  # stage 2: the task loss on the bare student
            return Losses(logits, self.task_terms(logits, y, x, index))
        return super().compute_losses(x, y, index)

    @property
    def stage(self) -> int:
        """1 while ``current_epoch < stage1_epochs`` (transfer), else 2 (task)."""
        return 1 if self.current_epoch < self.resolved_stage1_epochs() else 2

    @property
    def single_stage(self) -> bool:
        """True when there is no transfer-only stage: task + weighted transfer loss throughout."""
        return self.resolved_stage1_epochs() == 0

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            max_epochs = self.trainer.max_epochs
            n = self.resolved_stage1_epochs()
            if max_epochs is not None and max_epochs >= 0 and n >= max_epochs:
                raise KDConfigError(
                    f"stage1_epochs={self.stage1_epochs} ({n} epochs) >= trainer.max_epochs="
                    f"{max_epochs}: stage 2 (training on the task) would never run. Set "
                    f"stage1_epochs below max_epochs (e.g. a fraction such as 0.2), or 0 for a "
                    f"single-stage run.")

    def log_window_closes(self) -> bool:
        # no logged `train/loss` may average a stage-1 loss with a stage-2 loss
        return self.current_epoch + 1 == self.resolved_stage1_epochs()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.log("stage", float(self.stage), on_step=False, on_epoch=True, batch_size=1)
