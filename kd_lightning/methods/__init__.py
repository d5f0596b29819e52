"""One LightningModule per distillation method, all on :class:`DistillationModule`."""

from kd_lightning.methods.base import DistillationModule
from kd_lightning.methods.response import ResponseKD
from kd_lightning.methods.supervised import Supervised

__all__ = ["DistillationModule", "ResponseKD", "Supervised"]

from kd_lightning.methods.relation import RelationKD
from kd_lightning.methods.wasserstein import NonFiniteGradientError, WassersteinKD

__all__ += ["RelationKD", "WassersteinKD", "NonFiniteGradientError"]
