"""Atomic checkpoint files: a checkpoint path holds either its previous complete file or the new
complete file, never a partial one, whatever stops the process (a kill, a full disk, a power cut).

Lightning's :class:`~lightning_fabric.plugins.TorchCheckpointIO` serialises the checkpoint in
memory and lets ``fsspec`` write it to a temporary file in the system's temporary folder, then
moves that file over the target. When the temporary folder is on another filesystem (a tmpfs
``/tmp``, a cluster's node-local disk) the move is a copy into the target, which a kill or a
full disk cuts short; and nothing is flushed to the disk before the move, so after a power cut
the renamed file can be empty.

:class:`AtomicCheckpointIO` writes ``torch.save``'s output straight into a temporary file in the
target's own folder (``.<name>.<pid>.<n>.partial``), flushes it and ``fsync``\\ s it, and only then
renames it over the target with ``os.replace`` (atomic within one filesystem, POSIX ``rename``),
then ``fsync``\\ s the folder so the rename itself is on the disk. A write that fails removes its
temporary file; a full disk raises :class:`CheckpointWriteError`, which the CLI reports in one
line. A temporary file left by a killed process is removed at the next save of the same
checkpoint. Remote paths (``s3://`` ...) go to Lightning's own implementation.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem
from fsspec.implementations.local import LocalFileSystem

#: the suffix of a checkpoint being written (never a ``.ckpt`` file, so no checkpoint search
#: of Lightning's finds it)
PARTIAL_SUFFIX = ".partial"
_counter = itertools.count()


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the previous file at its path is unchanged)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic, durable writes of local files (module docstring).

    Installed by ``kd-lightning`` on every trainer whose strategy uses the plain
    ``TorchCheckpointIO``; in Python, ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in ``path``'s folder, flushed, synced
    and renamed over ``path``. Raises :class:`CheckpointWriteError` when the disk is full (or a
    quota is reached); every failure leaves ``path`` as it was and no temporary file behind."""
    _atomic_write(path, lambda f: torch.save(obj, f), f"resume with --ckpt_path {path}")


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy the file ``source`` to ``path`` as :func:`atomic_save` writes (a published
    checkpoint is never a partial or, after a power cut, an empty file)."""
    def copy(f) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    _atomic_write(path, copy, f"run the command again to copy {source} there")


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], then: str) -> None:
    """``write(file)`` into a new temporary file beside ``path``, flushed, synced and renamed over
    ``path``, the folder synced; on a full disk a :class:`CheckpointWriteError` that says to free
    space and then ``then``."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    partial, fd = _create_partial(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointWriteError(
                err.errno,
                f"the checkpoint {path} could not be written: {os.strerror(err.errno).lower()} "
                f"on the disk of {folder}. The previous {path.name} there is unchanged (writes "
                f"are atomic); free some space, then {then}.") from err
        raise
    _sync_folder(folder)
    _remove_stale_partials(path)


def _create_partial(path: Path) -> tuple[Path, int]:
    """A new, empty temporary file beside ``path`` (permissions as the umask allows, like any
    file the process creates) and its descriptor."""
    while True:
        partial = path.with_name(f".{path.name}.{os.getpid()}.{next(_counter)}{PARTIAL_SUFFIX}")
        try:
            return partial, os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_partials(path: Path) -> None:
    """Remove temporary files of ``path`` whose writing process no longer runs (it was killed)."""
    for partial in path.parent.glob(f".{path.name}.*{PARTIAL_SUFFIX}"):
        pid = partial.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(OSError):
                partial.unlink()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
