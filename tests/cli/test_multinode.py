"""One run over many nodes: multi-node DDP launched by torchrun, and the SLURM example scripts.

The torchrun tests run two "nodes" of one process each on this machine (two torchrun agents with
node ranks 0 and 1 meeting at 127.0.0.1, gloo), as two machines would run them. The SLURM tests
read the ``kd-lightning`` command lines out of ``examples/slurm/*.sbatch`` and parse them, and
run ``fit_ddp.sbatch`` itself as a requeued job would run twice (with stand-ins for ``srun`` and
``scontrol``), so the scripts cannot drift from the CLI.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, REPO, TINY

SLURM_DIR = REPO / "examples" / "slurm"

DUMP_STUDENT = '''
import os, torch
from pytorch_lightning import Callback

class DumpStudent(Callback):
    """Each rank saves its student's weights, its step count and how it was launched."""
    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
    def on_train_end(self, trainer, pl_module):
        torch.save({"student": {k: v.detach().clone() for k, v in pl_module.student.state_dict().items()},
                    "start_step": self.start_step, "step": trainer.global_step,
                    "world_size": trainer.world_size, "node_rank": trainer.node_rank,
                    "environment": type(trainer.strategy.cluster_environment).__name__},
                   os.path.join(os.getcwd(), f"student_rank{trainer.global_rank}.pt"))
'''


def _run_args(teacher: Path, *extra: str) -> list[str]:
    """A tiny ResponseKD fit on MNIST-1D (4 optimizer steps) that dumps every rank's student."""
    return ["fit", "--config", str(CONFIGS / "mnist1d/response.yaml"), *TINY,
            "--trainer.limit_train_batches", "4", "--data.train_subset", "800", "--data.batch_size", "50",
            "--model.init_args.teacher_checkpoint", str(teacher),
            "--trainer.callbacks+=dump_student.DumpStudent", *extra]


def _env(cwd: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC_")) and
           k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")}
    return {**env, "PYTHONPATH": f"{REPO}{os.pathsep}{cwd}", "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two_nodes(args: list[str], cwd: Path, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --nproc_per_node 1 --node_rank R ... -m kd_lightning.cli ARGS`` for
    R = 0 and 1 at once, as the two machines of a cluster would start it."""
    port = str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
         "-m", "kd_lightning.cli", *args, "--trainer.num_nodes", "2", "--trainer.strategy", "ddp",
         "--trainer.accelerator", "cpu", "--trainer.devices", "1"],
        cwd=cwd, env=_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            outs.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outs


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_node_run(mnist1d_teacher, tmp_path_factory) -> Path:
    """The tiny run launched by torchrun as two nodes of one process each; its folder."""
    work = tmp_path_factory.mktemp("torchrun")
    (work / "dump_student.py").write_text(DUMP_STUDENT)
    outs = _torchrun_two_nodes(_run_args(mnist1d_teacher), work)
    for rank, out in enumerate(outs):
        assert out.returncode == 0, f"node {rank}:\n{out.stderr[-4000:]}"
    assert "test/acc" in outs[0].stdout  # fit tests the best checkpoint on both nodes
    return work


@pytest.mark.ddp
def test_torchrun_two_nodes_end_with_identical_students(two_node_run):
    r0, r1 = _load(two_node_run / "student_rank0.pt"), _load(two_node_run / "student_rank1.pt")
    assert r0["environment"] == r1["environment"] == "TorchElasticEnvironment"
    assert r0["world_size"] == r1["world_size"] == 2
    assert (r0["node_rank"], r1["node_rank"]) == (0, 1)
    assert r0["step"] == r1["step"] == 4
    assert _same_weights(r0["student"], r1["student"])
    # one run folder (rank 0's), whose last checkpoint holds those weights
    runs = list((two_node_run / "runs" / "mnist1d_response").iterdir())
    assert [p.name for p in runs] == ["version_0"]
    ckpt = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert _same_weights(r0["student"], {k[len("student."):]: v for k, v in ckpt.items()
                                         if k.startswith("student.")})
    assert (runs[0] / "train_subset.json").is_file()


@pytest.mark.ddp
@pytest.mark.slow
def test_torchrun_two_nodes_equal_two_processes_on_one_node(two_node_run, mnist1d_teacher, tmp_path):
    """Two nodes of one process and one node of two processes are the same DDP run: same seed,
    same data shards, same all-reduce, bit for bit the same student."""
    (tmp_path / "dump_student.py").write_text(DUMP_STUDENT)
    out = subprocess.run(
        [sys.executable, "-m", "kd_lightning.cli", *_run_args(
            mnist1d_teacher, "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
            "--trainer.devices", "2")],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    one_node = _load(tmp_path / "student_rank0.pt")
    assert one_node["environment"] == "LightningEnvironment" and one_node["world_size"] == 2
    assert _same_weights(one_node["student"], _load(two_node_run / "student_rank0.pt")["student"])


# ---- SLURM example scripts ---------------------------------------------------------------------

def _command(script: Path, program: str) -> list[str]:
    """The ``program ...`` command line of an sbatch script (continuation lines joined), split as
    the shell would split it, ``$VARS`` left in place."""
    text = re.sub(r"\\\n\s*", " ", script.read_text())
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    found = [line for line in lines if re.match(rf"(srun\s+)?{re.escape(program)}\s", line)]
    assert len(found) == 1, f"{script.name}: expected one `{program}` command, found {found}"
    return shlex.split(found[0])


def _substitute(words: list[str], values: dict[str, str]) -> list[str]:
    """Expand ``$VAR``, ``${VAR}`` and drop ``${VAR:+...}`` / ``"$@"`` as on a job's first start."""
    out, skipping = [], False
    for word in words:
        if word.startswith("${") and ":+" in word:  # ${RESUME:+--ckpt_path "$RESUME"}: unset
            skipping = not word.endswith("}")
            continue
        if skipping:
            skipping = not word.endswith("}")
            continue
        if word == "$@":
            continue
        word = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], word)
        out.append(word)
    return out


def test_fit_sbatch_requests_requeue_before_the_time_limit():
    text = (SLURM_DIR / "fit_ddp.sbatch").read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in text and "#SBATCH --requeue" in text
    # Lightning checks that devices = tasks per node: the script requests one task per GPU
    assert re.search(r"#SBATCH --ntasks-per-node=(\d+)", text).group(1) == \
        re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1)


def test_fit_sbatch_command_line_parses(monkeypatch, tmp_path):
    """The script's ``kd-lightning fit`` flags parse (config, trainer flags, logger overrides)
    as on a 2-node x 4-GPU job; classes are not built (no GPU, no CIFAR files here)."""
    from kd_lightning import cli

    words = _command(SLURM_DIR / "fit_ddp.sbatch", "kd-lightning")
    assert words[:3] == ["srun", "kd-lightning", "fit"]
    job = {"CONFIG": str(REPO / "configs/cifar100/response_resnet56_resnet20.yaml"),
           "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_ID": "4242",
           "RUN_NAME": "kd-fit", "RUN_DIR": "runs/kd-fit/job_4242"}
    args = _substitute(words[3:], job)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.KDLightningCLI, "instantiate_classes", lambda self: None)
    monkeypatch.setattr(sys, "argv", ["kd-lightning"])
    parsed = cli.cli_main(args, run=False).config  # (run=False: the parser of `fit` alone)
    assert parsed.trainer.num_nodes == 2 and int(parsed.trainer.devices) == 4  # (Lightning takes "4")
    assert parsed.trainer.strategy == "ddp" and parsed.trainer.accelerator == "gpu"
    assert parsed.trainer.logger.init_args.version == "job_4242"
    assert parsed.trainer.logger.init_args.name == "kd-fit"
    assert parsed.model.class_path == "kd_lightning.methods.ResponseKD"


def test_study_sbatch_command_line_parses():
    from kd_lightning.study.cli import build_parser

    words = _command(SLURM_DIR / "study_ray.sbatch", "kd-lightning-study")
    args = _substitute(words[1:], {"STUDY_CONFIG": "configs/studies/mnist1d.yaml",
                                   "OUTPUT": "studies/kd-study", "ADDRESS": "10.0.0.1:6379"})
    parsed, rest = build_parser().parse_known_args(args)
    assert rest == []
    assert parsed.address == "10.0.0.1:6379"
    assert (REPO / parsed.config).is_file()


FAKE_SCONTROL = """#!/bin/sh
# scontrol stand-in: record the request; a requeue ends the running job with SIGTERM, as SLURM does
echo "$@" >> "$KD_TEST_SCONTROL_LOG"
kill -TERM $PPID
"""


def _slurm_job(tmp_path: Path, teacher: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    """Run ``fit_ddp.sbatch`` as SLURM would start job 4242 with one task (a tiny CPU run),
    ``srun`` and ``scontrol`` replaced by stand-ins, ``kd-lightning`` by this checkout's CLI."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {"srun": '#!/bin/sh\nexec "$@"\n', "scontrol": FAKE_SCONTROL,
                       "kd-lightning": f'#!/bin/sh\nexec "{sys.executable}" -m kd_lightning.cli "$@"\n'
                       }.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = _env(tmp_path, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               CONFIG=str(CONFIGS / "mnist1d/response.yaml"), SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="kd-fit", SLURM_NNODES="1", SLURM_NTASKS="1",
               SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
               SLURM_NODELIST="localhost", MASTER_PORT=str(_free_port()),
               KD_TEST_SCONTROL_LOG=str(tmp_path / "scontrol.log"))
    if kill_at:
        env.update(KD_TEST_KILL_AT=kill_at, KD_TEST_SIGNAL="SIGUSR1")
    args = _run_args(teacher, "--trainer.accelerator", "cpu",
                     "--trainer.limit_train_batches", "6", "--trainer.callbacks+=kill_helpers.KillAt",
                     "--test_after_fit", "false")
    return subprocess.run(["bash", str(SLURM_DIR / "fit_ddp.sbatch"), *args[3:]], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_fit_sbatch_requeued_job_resumes_where_it_stopped(mnist1d_teacher, tmp_path):
    """SIGUSR1 before the time limit: Lightning's SLURM auto-requeue saves hpc_ckpt_1.ckpt and
    calls ``scontrol requeue 4242``; SLURM then stops the job with SIGTERM, kd-lightning saves
    interrupted.ckpt and exits 143. The requeued job (same job id) resumes from the newest
    checkpoint in its run folder and finishes the remaining steps."""
    (tmp_path / "dump_student.py").write_text(DUMP_STUDENT)
    (tmp_path / "kill_helpers.py").write_text((REPO / "tests" / "kill_helpers.py").read_text())
    first = _slurm_job(tmp_path, mnist1d_teacher, kill_at="0:2")
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-4000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    run_dir = tmp_path / "runs" / "kd-fit" / "job_4242"
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file()
    assert (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
    assert not (tmp_path / "student_rank0.pt").exists()  # training did not finish

    second = _slurm_job(tmp_path, mnist1d_teacher, kill_at=None)
    assert second.returncode == 0, second.stderr[-4000:]
    done = _load(tmp_path / "student_rank0.pt")
    assert done["environment"] == "SLURMEnvironment"
    assert 2 <= done["start_step"] < 6 and done["step"] == 6  # resumed, not restarted
    assert [p.name for p in (tmp_path / "runs" / "kd-fit").iterdir()] == ["job_4242"]
