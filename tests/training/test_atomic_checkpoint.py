"""Atomic checkpoint writes: a kill or a full disk while ``last.ckpt`` is written leaves the
previous ``last.ckpt`` complete (and a run resumes from it), never a partial file."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning_fabric.plugins import TorchCheckpointIO

from tests.conftest import CONFIGS, REPO, TINY, run_cli

#: a callback that makes every checkpoint from the second epoch on large (as a large network's
#: is), so that writing it takes long enough to be caught in the middle
BALLAST = '''
import torch
from pytorch_lightning import Callback

class Ballast(Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.current_epoch >= 1:
            checkpoint["ballast"] = torch.ones(40_000_000)  # 160 MB
'''

STUDENT = ["--config", CONFIGS / "mnist1d/student.yaml", *TINY, "--trainer.max_epochs", "2",
           "--test_after_fit", "false"]


def real_load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def _popen(args: list, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{cwd}", "PYTHONWARNINGS": "ignore",
                "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "kd_lightning.cli", *map(str, args)], cwd=cwd,
                            env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture
def other_filesystem_tmpdir(tmp_path):
    """TMPDIR on another filesystem than ``tmp_path`` where the machine has one (a tmpfs
    /dev/shm), as on systems with a tmpfs /tmp: a checkpoint staged in TMPDIR and moved over the
    target is then copied into it. Removed afterwards, with anything left in it."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev):
        yield {}
        return
    folder = Path(tempfile.mkdtemp(prefix="kd_test_", dir=shm))
    try:
        yield {"TMPDIR": str(folder)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _kill_during_second_save(proc: subprocess.Popen, last: Path, timeout: float = 300) -> bool:
    """Wait for the first ``last.ckpt``, then SIGKILL the run as soon as the next write of it
    starts (a temporary file of it appears beside it, or the file itself changes). Returns
    whether a temporary file was seen."""
    deadline = time.monotonic() + timeout
    while not last.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)  # the first write is complete once the file has its name
    first = last.stat()
    while True:
        partials = list(last.parent.glob(f".{last.name}*"))
        try:
            now = last.stat()
            changed = (now.st_ino, now.st_size, now.st_mtime_ns) != (first.st_ino, first.st_size, first.st_mtime_ns)
        except FileNotFoundError:
            changed = True
        if partials or changed:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return bool(partials)
        assert proc.poll() is None, "the run ended before its second checkpoint write was caught"
        assert time.monotonic() < deadline
        time.sleep(0.0005)


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_and_the_run_resumes(tmp_path,
                                                                                     other_filesystem_tmpdir):
    (tmp_path / "ballast.py").write_text(BALLAST)
    env = other_filesystem_tmpdir
    proc = _popen(["fit", *STUDENT, "--trainer.callbacks+=ballast.Ballast"], tmp_path, env)
    try:
        last = tmp_path / "runs/mnist1d_student/version_0/checkpoints/last.ckpt"
        killed_while_writing = _kill_during_second_save(proc, last)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # the previous checkpoint, whole: the first epoch's
    state = real_load(last)
    assert state["epoch"] == 0 and "ballast" not in state
    assert killed_while_writing  # the kill came while the new file was written beside it
    resumed = _popen(["fit", *STUDENT, "--ckpt_path", last], tmp_path, env)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert real_load(last)["epoch"] == 1
    # the killed write's temporary file is gone (removed at the next save of last.ckpt)
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_with_one_message(tmp_path, monkeypatch, capsys):
    """Writing a checkpoint of the second epoch fails half-way with ENOSPC."""
    monkeypatch.chdir(tmp_path)
    real_save = torch.save

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "state_dict" in obj and obj.get("epoch", 0) >= 1:
            data = io.BytesIO()
            real_save(obj, data, *args, **kwargs)
            half = data.getvalue()[: len(data.getvalue()) // 2]
            if hasattr(f, "write"):
                f.write(half)
            else:
                Path(f).write_bytes(half)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", *STUDENT])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kd-lightning: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "no space left on device" in lines[0] and "unchanged" in lines[0]
    folder = tmp_path / "runs/mnist1d_student/version_0/checkpoints"
    for name in ("best.ckpt", "last.ckpt"):  # both still the first epoch's, whole
        assert real_load(folder / name)["epoch"] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporary file


def test_the_cli_writes_checkpoints_atomically_and_keeps_a_checkpoint_io_it_is_given(tmp_path, monkeypatch):
    from kd_lightning.cli import cli_main
    from kd_lightning.training.checkpoint_io import AtomicCheckpointIO

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kd-lightning"])
    trainer = cli_main(["--config", str(CONFIGS / "mnist1d/student.yaml")], run=False).trainer
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    trainer = cli_main(["--config", str(CONFIGS / "mnist1d/student.yaml"),
                        "--trainer.plugins", "lightning_fabric.plugins.TorchCheckpointIO"], run=False).trainer
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO


def test_a_failed_write_removes_its_temporary_file_and_raises(tmp_path, monkeypatch):
    from kd_lightning.training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError

    io_plugin = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    before = target.read_bytes()

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io_plugin.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EDQUOT, "quota")))
    with pytest.raises(CheckpointWriteError, match="could not be written: disk quota exceeded"):
        io_plugin.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_published_checkpoint_is_copied_atomically_and_durably(tmp_path, monkeypatch):
    """PublishBest's copy (atomic_copy): the bytes of the source, synced before the rename; a
    full disk keeps the file that was there, names what to do, and leaves no temporary file."""
    from kd_lightning.training import checkpoint_io
    from kd_lightning.training.checkpoint_io import CheckpointWriteError, atomic_copy

    source, target = tmp_path / "best.ckpt", tmp_path / "published" / "best.ckpt"
    source.write_bytes(os.urandom(3000))
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(checkpoint_io.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    atomic_copy(source, target)
    assert target.read_bytes() == source.read_bytes() and len(synced) == 2  # the file, then its folder
    before = target.read_bytes()
    source.write_bytes(b"another checkpoint")

    def full(src, dst, *args):
        dst.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_io.shutil, "copyfileobj", full)
    with pytest.raises(CheckpointWriteError, match=f"free some space, then run the command again to copy {source}"):
        atomic_copy(source, target)
    assert target.read_bytes() == before and [p.name for p in target.parent.iterdir()] == ["best.ckpt"]
