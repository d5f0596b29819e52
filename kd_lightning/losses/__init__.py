"""Distillation losses as plain functions (no Lightning imports).

Each function documents its formula and the paper it comes from.
"""

from kd_lightning.losses.response import kd_loss, response_kd_loss, soft_cross_entropy

__all__ = ["kd_loss", "response_kd_loss", "soft_cross_entropy"]
