"""Loading teacher weights from a ``kd-lightning fit`` checkpoint or a plain state_dict."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kd_lightning import KDConfigError

#: prefixes under which a LightningModule of this package stores its trained network
_PREFIXES = ("student.", "model.", "net.", "module.")


def extract_state_dict(obj: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Find ``model``'s weights in a loaded checkpoint object.

    Accepts a Lightning checkpoint (``{"state_dict": {"student.conv1.weight": ...}}``, the
    network trained by :class:`~kd_lightning.methods.Supervised` is ``student``) or a plain
    ``state_dict`` with or without a ``module.``/``model.`` prefix.
    """
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise KDConfigError("the teacher checkpoint holds no state_dict.")
    expected = set(model.state_dict())
    if expected & set(state):
        return {k: v for k, v in state.items() if k in expected or not any(
            k.startswith(p) for p in _PREFIXES)}
    for prefix in _PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub and expected & set(sub):
            return sub
    return state


def load_teacher_weights(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model`` strictly, with errors that say what does not fit."""
    path = Path(path)
    if not path.is_file():
        raise KDConfigError(
            f"teacher checkpoint '{path}' does not exist. Train the teacher first, e.g. "
            f"`kd-lightning fit --config configs/mnist1d/teacher.yaml`, then point "
            f"model.init_args.teacher_checkpoint at the .ckpt it writes (see the run's "
            f"checkpoints/ folder), or at a plain state_dict file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise KDConfigError(f"cannot read teacher checkpoint '{path}' with weights_only=True: "
                            f"{err}") from None
    state = extract_state_dict(obj, model)
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise KDConfigError(
                f"teacher checkpoint '{path}' does not fit the configured teacher "
                f"{type(model).__name__}: key '{key}' (shape {tuple(value.shape)}) is missing from "
                f"the checkpoint. Configure the teacher architecture the checkpoint was trained with.")
        if tuple(state[key].shape) != tuple(value.shape):
            raise KDConfigError(
                f"teacher checkpoint '{path}' does not fit the configured teacher "
                f"{type(model).__name__}: first mismatching key '{key}' has shape "
                f"{tuple(state[key].shape)} in the checkpoint but {tuple(value.shape)} in the model. "
                f"Configure the teacher architecture the checkpoint was trained with.")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise KDConfigError(
            f"teacher checkpoint '{path}' does not fit the configured teacher "
            f"{type(model).__name__}: it has unexpected key '{unexpected[0]}' "
            f"(shape {tuple(state[unexpected[0]].shape)}). Configure the teacher architecture the "
            f"checkpoint was trained with.")
    model.load_state_dict(state, strict=True)
