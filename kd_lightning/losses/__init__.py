"""Distillation losses as plain functions (no Lightning imports).

Each function documents its formula and the paper it comes from.
"""

from kd_lightning.losses.response import kd_loss, response_kd_loss, soft_cross_entropy

__all__ = ["kd_loss", "response_kd_loss", "soft_cross_entropy"]

from kd_lightning.losses.relation import pairwise_distances, rkd_angle_loss, rkd_distance_loss, rkd_loss
from kd_lightning.losses.wasserstein import input_gradient_norm, wasserstein_kd_loss

__all__ += ["pairwise_distances", "rkd_angle_loss", "rkd_distance_loss", "rkd_loss",
            "input_gradient_norm", "wasserstein_kd_loss"]
