"""Loading teacher weights: ``kd-lightning fit`` checkpoints, plain state_dicts, RepDistiller files.

Recognised layouts (the first whose keys fit the configured network exactly is used):

- a Lightning checkpoint of this package: ``{"state_dict": {"student.conv1.weight": ...}}`` (the
  network trained by :class:`~kd_lightning.methods.Supervised` is ``student``);
- a plain ``state_dict``, with or without a ``module.`` / ``model.`` / ``net.`` prefix;
- a checkpoint of RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020;
  the CIFAR-100 teachers most distillation papers start from): the weights under a ``model`` key,
  beside training metadata (epoch, accuracy, optimizer state, an ``argparse.Namespace``). Its CIFAR
  ResNets use the key names of :class:`~kd_lightning.models.CifarResNet`; its Wide ResNets name
  the stages ``blockK.layer.i.`` (here ``layerK.i.``), the 1x1 shortcut ``convShortcut`` (here
  ``downsample``) and the final BatchNorm ``bn1.`` (here ``bn.``), which :func:`repdistiller_wrn_keys`
  maps. Files from PyTorch < 0.4.1 lack the BatchNorm ``num_batches_tracked`` counters, which do
  not change an evaluated network; the model's own are kept.

Safety: a file is only ever read with ``torch.load(weights_only=True)``, whose unpickler builds
tensors, containers and primitive values and refuses every other Python object, so a checkpoint
cannot run code. RepDistiller files also pickle the run's ``argparse.Namespace``; when (and only
when) ``weights_only`` refuses that class, the file is read again with exactly
``argparse.Namespace`` allowed through ``torch.serialization.safe_globals`` (a Namespace only sets
attributes from already-unpickled values). Anything else is refused with
:class:`~kd_lightning.KDConfigError`, and so is a raw pickle (``pickle.dump``), which torch.save
never writes (:func:`raw_pickle`). The CLI reads a ``--ckpt_path`` with the same function.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kd_lightning import KDConfigError

#: prefixes under which a LightningModule (or a wrapper such as DataParallel) stores a network
_PREFIXES = ("student.", "model.", "net.", "module.")
#: keys under which a training script stores the weights beside other state
_WEIGHT_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
#: how many missing / unexpected keys an error names
_SHOWN = 5


def repdistiller_wrn_keys(key: str) -> str:
    """A RepDistiller Wide ResNet key in :class:`~kd_lightning.models.WideResNet`'s naming.

    ``blockK.layer.i.X`` -> ``layerK.i.X``, ``...convShortcut.`` -> ``...downsample.``, the final
    BatchNorm ``bn1.`` (top level) -> ``bn.``; every other key is unchanged. The two networks
    compute the same function: pre-activation blocks whose 1x1 shortcut (where the channel count
    changes) takes the pre-activated input, a final BN-ReLU, 8x8 average pooling and ``fc``.
    """
    key = re.sub(r"^block(\d+)\.layer\.", r"layer\1.", key)
    key = key.replace(".convShortcut.", ".downsample.")
    return re.sub(r"^bn1\.", "bn.", key)


#: key renamings tried in order: (description, function)
LAYOUTS: list[tuple[str, Callable[[str], str]]] = [
    ("kd_lightning / plain state_dict", lambda key: key),
    ("RepDistiller Wide ResNet", repdistiller_wrn_keys),
]


#: the first bytes of a file in torch.save's legacy (non-zip) format: the pickled magic number
_LEGACY_TORCH_PREFIX = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
#: the pickle opcode PROTO, the first byte of every pickle of protocol 2 or later
_PICKLE_PROTO = b"\x80"


def raw_pickle(path: str | Path) -> bool:
    """True for a plain pickle (``pickle.dump``): neither torch.save's zip archive nor its
    legacy format, whose first pickle is torch's magic number. ``torch.load`` reads neither a
    raw pickle's tensors nor its objects, so such a file is never a checkpoint."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_PREFIX))
    return head.startswith(_PICKLE_PROTO) and head != _LEGACY_TORCH_PREFIX \
        and not zipfile.is_zipfile(path)


def read_checkpoint(path: str | Path, label: str | None = None, trusted_advice: str | None = None,
                    allow_namespace: bool = True, mmap: bool = False) -> object:
    """``torch.load(path, weights_only=True)``, allowing ``argparse.Namespace`` only if needed.

    Raises :class:`KDConfigError` for a missing, empty, corrupt or truncated file, a raw pickle
    (not written by torch.save), and a file that holds any other Python object (it is never
    unpickled, so it cannot run).

    Args:
        label: how messages name the file (default ``teacher checkpoint '<path>'``).
        trusted_advice: what a message about a refused object advises (default: save the
            weights as a plain state_dict for ``teacher_checkpoint``).
        allow_namespace: retry with ``argparse.Namespace`` allowed (RepDistiller files); off
            for a file Lightning will load with plain ``weights_only=True``.
        mmap: map the tensors' storage instead of reading it (a zip file only): enough to
            inspect keys and shapes.
    """
    path = Path(path)
    label = label or f"teacher checkpoint '{path}'"
    if not path.is_file():
        raise KDConfigError(
            f"{label} does not exist. Train the teacher first, e.g. "
            f"`kd-lightning fit --config configs/mnist1d/teacher.yaml`, then point "
            f"model.init_args.teacher_checkpoint at the .ckpt it writes (see the run's "
            f"checkpoints/ folder), or at a plain state_dict file.")
    size = path.stat().st_size
    if size == 0:
        raise KDConfigError(f"{label} is an empty file (0 bytes): it was not "
                            f"written completely. Copy or save the checkpoint again.")
    if raw_pickle(path):
        raise KDConfigError(
            f"{label} ({size} bytes) is a raw pickle (pickle.dump), not a checkpoint written by "
            f"torch.save, and is not loaded (unpickling it could run code). Save the weights with "
            f"torch.save(model.state_dict(), path), or use a checkpoint of `kd-lightning fit`.")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            if not allow_namespace or _refused_global(err) != "argparse.Namespace":
                raise
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        name = _refused_global(err)
        if name is None:
            raise _corrupt(label, size, err) from None
        allowed = "tensors, containers, numbers, strings and argparse.Namespace" if allow_namespace \
            else "tensors, containers, numbers and strings"
        advice = trusted_advice or (
            "If you trust the file, save just its weights (the model's state_dict) with torch.save "
            "and point model.init_args.teacher_checkpoint at that file.")
        raise KDConfigError(
            f"{label} holds a Python object of type {name}, which is not "
            f"loaded: checkpoints are read with torch.load(weights_only=True), which unpickles only "
            f"{allowed}, so that a file cannot run code. {advice}") from None
    except Exception as err:  # noqa: BLE001 - torch reports corruption as several exception types
        raise _corrupt(label, size, err) from None


def _refused_global(err: BaseException) -> str | None:
    """The class or function name a ``weights_only`` load refused, if that was the failure."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else None


def _corrupt(label: str, size: int, err: BaseException) -> KDConfigError:
    detail = (str(err).strip().splitlines() or [""])[0][:200]
    return KDConfigError(
        f"{label} ({size} bytes) is corrupt or truncated and cannot be read "
        f"({type(err).__name__}{': ' + detail if detail else ''}). Copy or save the checkpoint "
        f"again; a file written by torch.save or `kd-lightning fit` is expected.")


def _weights_of(obj: object) -> dict[str, torch.Tensor]:
    """The tensor dictionary inside a loaded checkpoint object."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _WEIGHT_KEYS:
            value = obj.get(key)
            if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                return value
    raise KDConfigError(
        f"the teacher checkpoint holds no state_dict: expected a dictionary of tensors, or one "
        f"under one of the keys {', '.join(_WEIGHT_KEYS)}; found "
        f"{type(obj).__name__}{' with keys ' + ', '.join(map(str, list(obj)[:8])) if isinstance(obj, dict) else ''}.")


def _candidates(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The state itself and each known prefix stripped from it."""
    out = [state]
    for prefix in _PREFIXES:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            out.append(sub)
    return out


def extract_state_dict(obj: object, model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights in a loaded checkpoint object, renamed to ``model``'s key names.

    Tries every recognised layout (see the module docstring) and returns the first whose keys are
    exactly ``model``'s (missing ``num_batches_tracked`` counters are taken from ``model``). Raises
    :class:`KDConfigError` naming the first missing and unexpected keys of the closest layout when
    none fits.
    """
    state = _weights_of(obj)
    own = model.state_dict()
    expected = set(own)
    best: tuple | None = None
    for candidate in _candidates(state):
        for name, rename in LAYOUTS:
            mapped = {rename(k): v for k, v in candidate.items()}
            missing = [k for k in own if k not in mapped]
            unexpected = [k for k in mapped if k not in expected]
            if not unexpected and all(k.endswith("num_batches_tracked") for k in missing):
                return {**{k: own[k] for k in missing}, **mapped}
            overlap = len(expected) - len(missing)
            if best is None or overlap > best[0]:
                best = (overlap, name, missing, unexpected, mapped)
    _, name, missing, unexpected, mapped = best

    def listing(keys: list[str], source: dict) -> str:
        shown = ", ".join(f"'{k}' {tuple(source[k].shape)}" for k in keys[:_SHOWN])
        return f"{len(keys)} ({shown}{', ...' if len(keys) > _SHOWN else ''})"

    raise KDConfigError(
        f"the teacher checkpoint matches no known layout for the configured teacher "
        f"{type(model).__name__}. Closest layout ({name}): keys of the model missing from the "
        f"checkpoint: {listing(missing, own) if missing else 0}; unexpected keys in the checkpoint: "
        f"{listing(unexpected, mapped) if unexpected else 0}. Layouts tried: "
        f"{', '.join(n for n, _ in LAYOUTS)}, each also without a {'/'.join(_PREFIXES)} prefix. "
        f"Configure the teacher architecture the checkpoint was trained with.")


def load_teacher_weights(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model`` strictly, with errors that say what does not fit.

    See the module docstring for the recognised layouts and how files are read safely.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    try:
        state = extract_state_dict(obj, model)
    except KDConfigError as err:
        raise KDConfigError(f"teacher checkpoint '{path}': {err}") from None
    for key, value in model.state_dict().items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise KDConfigError(
                f"teacher checkpoint '{path}' does not fit the configured teacher "
                f"{type(model).__name__}: first mismatching key '{key}' has shape "
                f"{tuple(state[key].shape)} in the checkpoint but {tuple(value.shape)} in the model. "
                f"Configure the teacher architecture the checkpoint was trained with.")
    model.load_state_dict(state, strict=True)
