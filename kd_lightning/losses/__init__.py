"""Distillation losses as plain functions (no Lightning imports).

Each function documents its formula and the paper it comes from.
"""

from kd_lightning.losses.labels import UNLABELLED, labelled_cross_entropy, labelled_mask, labelled_mean
from kd_lightning.losses.logit_matching import logit_matching_loss
from kd_lightning.losses.response import (
    kd_loss,
    response_kd_loss,
    response_terms,
    soft_cross_entropy,
)

__all__ = ["kd_loss", "logit_matching_loss", "response_kd_loss", "response_terms", "soft_cross_entropy",
           "UNLABELLED", "labelled_cross_entropy", "labelled_mask", "labelled_mean"]

from kd_lightning.losses.relation import pairwise_distances, rkd_angle_loss, rkd_distance_loss, rkd_loss
from kd_lightning.losses.wasserstein import input_gradient_norm, wasserstein_kd_loss

__all__ += ["pairwise_distances", "rkd_angle_loss", "rkd_distance_loss", "rkd_loss",
            "input_gradient_norm", "wasserstein_kd_loss"]

from kd_lightning.losses.feature import (
    ab_loss,
    at_loss,
    attention_map,
    fsp_loss,
    fsp_matrix,
    hint_loss,
    pool_to_smaller,
)

__all__ += ["ab_loss", "at_loss", "attention_map", "fsp_loss", "fsp_matrix", "hint_loss",
            "pool_to_smaller"]

from kd_lightning.losses.mutual import (
    imitation_weight,
    knowledge_loss,
    mutual_student_loss,
    rule_regularized_teacher,
    rule_weight_loss,
)

__all__ += ["imitation_weight", "knowledge_loss", "mutual_student_loss", "rule_regularized_teacher",
            "rule_weight_loss"]

from kd_lightning.losses.correlation import cc_correlation_matrix, cc_loss
from kd_lightning.losses.decoupled import dkd_loss, dkd_terms, dkd_warmup_weight
from kd_lightning.losses.dist import dist_loss, dist_terms, pearson_correlation
from kd_lightning.losses.logit_standardization import standardize_logits, standardized_kd_loss
from kd_lightning.losses.nst import nst_loss, nst_mmd2, polynomial_kernel
from kd_lightning.losses.probabilistic import pkt_conditional_probabilities, pkt_loss
from kd_lightning.losses.similarity import similarity_matrix, sp_loss

__all__ += ["cc_correlation_matrix", "cc_loss", "dkd_loss", "dkd_terms", "dkd_warmup_weight",
            "dist_loss", "dist_terms", "pearson_correlation", "standardize_logits",
            "standardized_kd_loss", "nst_loss", "nst_mmd2", "polynomial_kernel",
            "pkt_conditional_probabilities", "pkt_loss", "similarity_matrix", "sp_loss"]

from kd_lightning.losses.crd import CRDEmbed, CRDMemoryBank, crd_loss, crd_nce_loss
from kd_lightning.losses.factor_transfer import (
    Paraphraser,
    Translator,
    ft_factor,
    ft_loss,
    ft_reconstruction_loss,
)
from kd_lightning.losses.ofd import (
    ofd_loss,
    ofd_margin,
    ofd_margin_from_bn,
    ofd_partial_l2,
    ofd_stage_weights,
)
from kd_lightning.losses.review import ABF, build_abfs, hcl_loss, review_chain
from kd_lightning.losses.vid import VIDRegressor, vid_loss

__all__ += ["CRDEmbed", "CRDMemoryBank", "crd_loss", "crd_nce_loss",
            "Paraphraser", "Translator", "ft_factor", "ft_loss", "ft_reconstruction_loss",
            "ofd_loss", "ofd_margin", "ofd_margin_from_bn", "ofd_partial_l2", "ofd_stage_weights",
            "ABF", "build_abfs", "hcl_loss", "review_chain",
            "VIDRegressor", "vid_loss"]

from kd_lightning.losses.online import deep_mutual_learning_loss

__all__ += ["deep_mutual_learning_loss"]
