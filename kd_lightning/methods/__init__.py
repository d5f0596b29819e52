"""One LightningModule per distillation method, all on :class:`DistillationModule`."""

from kd_lightning.methods.base import DistillationModule
from kd_lightning.methods.response import ResponseKD
from kd_lightning.methods.supervised import Supervised

__all__ = ["DistillationModule", "ResponseKD", "Supervised"]

from kd_lightning.methods.relation import RelationKD
from kd_lightning.methods.wasserstein import NonFiniteGradientError, WassersteinKD

__all__ += ["RelationKD", "WassersteinKD", "NonFiniteGradientError"]

from kd_lightning.methods.activation_boundary import ActivationBoundary
from kd_lightning.methods.attention import AttentionTransfer
from kd_lightning.methods.feature import FeatureDistillation, TwoStageFeatureDistillation
from kd_lightning.methods.fitnet import FitNet
from kd_lightning.methods.fsp import FSP

__all__ += ["FitNet", "FSP", "ActivationBoundary", "AttentionTransfer", "FeatureDistillation",
            "TwoStageFeatureDistillation"]

from kd_lightning.methods.mutual import MutualDistillation

__all__ += ["MutualDistillation"]

from kd_lightning.methods.logit_matching import LogitMatching

__all__ += ["LogitMatching"]

from kd_lightning.methods.embedding import CorrelationCongruence, ProbabilisticKnowledgeTransfer
from kd_lightning.methods.logits import DIST, DecoupledKD, StandardizedKD
from kd_lightning.methods.nst import NeuronSelectivityTransfer
from kd_lightning.methods.similarity import SimilarityPreserving

__all__ += ["SimilarityPreserving", "ProbabilisticKnowledgeTransfer", "NeuronSelectivityTransfer",
            "CorrelationCongruence", "DecoupledKD", "DIST", "StandardizedKD"]

from kd_lightning.methods.crd import CRD
from kd_lightning.methods.factor_transfer import FactorTransfer
from kd_lightning.methods.ofd import OFD
from kd_lightning.methods.review import ReviewKD
from kd_lightning.methods.vid import VID

__all__ += ["VID", "FactorTransfer", "CRD", "OFD", "ReviewKD"]

from kd_lightning.methods.dml import DeepMutualLearning

__all__ += ["DeepMutualLearning"]
