"""Checks of a method's networks against the data, before anything is trained."""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning import KDConfigError


@torch.no_grad()
def check_class_counts(student: nn.Module, teacher: nn.Module | None, input_shape: tuple[int, ...],
                       k_data: int | None, num_classes: int | None, device: torch.device) -> None:
    """Run both networks on two zero inputs of the data's shape: each must accept it, and the
    student's, the teacher's, the data's and the configured class counts must agree."""
    x = torch.zeros(2, *input_shape, device=device)
    counts = {}
    for name, net in (("student", student), ("teacher", teacher)):
        if net is None:
            continue
        was_training = net.training
        net.eval()
        try:
            out = net(x)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise KDConfigError(
                f"the {name} ({type(net).__name__}) cannot process inputs of shape "
                f"{tuple(x.shape)} from the data module: {err}. Check its input size / "
                f"channel arguments against the data set.") from None
        finally:
            net.train(was_training and name == "student")
        counts[name] = out.shape[-1]
    if k_data is not None:
        counts["data"] = k_data
    if num_classes is not None:
        counts["model.num_classes"] = num_classes
    if len(set(counts.values())) > 1:
        desc = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise KDConfigError(
            f"class counts disagree ({desc}). Set num_classes of the student and the teacher "
            f"to the data set's number of classes.")
