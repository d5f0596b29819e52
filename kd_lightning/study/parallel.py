"""The study's runs as Ray tasks: on a local Ray instance (``--workers N``) or a cluster
(``--address``).

Each run is one task with declared resources (``--cpus-per-run``, ``--gpus-per-run``; a fraction
of a GPU lets several small runs share one). A task executes the same
:func:`kd_lightning.study.runner.run_kd_lightning` as a sequential study, with the run's torch and
OpenMP threads set to its CPUs, so concurrent runs do not oversubscribe the cores, and returns its
metrics; the driver alone writes ``results.csv``. The teacher is trained by the driver before any
task starts and reaches the tasks as a checkpoint file in the teacher cache, so on a cluster the
study folder and the teacher cache must be on a file system every node sees (as the data are).

Ray is optional: ``pip install kd_lightning[ray]``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import kd_lightning
from kd_lightning import KDConfigError

INSTALL_HINT = "pip install kd_lightning[ray]"


def import_ray():
    """The ``ray`` module, or a :class:`KDConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise KDConfigError(f"--workers and --address run the study on Ray, which is not "
                            f"installed; install it with `{INSTALL_HINT}` (or run the study "
                            f"sequentially, without --workers/--address).") from None
    return ray


def run_cell(args: list[str], log_file: str, isolate: bool, threads: int, validate: bool,
             save_weights: str | None) -> dict[str, Any]:
    """One run inside a Ray worker: ``{"metrics": {...}, "seconds": s}`` or ``{"error": why}``.

    The worker process runs one task at a time; its torch and OpenMP threads are set to the
    task's CPUs (and so are those of a run that goes to a subprocess, through OMP_NUM_THREADS).
    """
    import torch

    from kd_lightning.study.runner import RunFailed, run_kd_lightning

    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    start = time.perf_counter()
    try:
        metrics = run_kd_lightning(args, Path(log_file), isolate, validate=validate,
                                   save_weights=None if save_weights is None else Path(save_weights))
    except RunFailed as err:
        return {"error": str(err)}
    return {"metrics": metrics, "seconds": time.perf_counter() - start}


class RayRuns:
    """Runs on Ray: ``submit`` a run, ``next`` gives back whichever finishes first.

    ``workers``: start a local Ray instance with that many CPUs; ``address``: join the cluster
    there (``auto`` for the one this node belongs to). The instance a study started is shut down
    when the study ends; a cluster it joined keeps running.
    """

    def __init__(self, workers: int | None = None, address: str | None = None,
                 cpus_per_run: float = 1.0, gpus_per_run: float = 0.0) -> None:
        if (workers is None) == (address is None):
            raise KDConfigError("give either --workers N (a local Ray instance) or --address ADDR "
                                "(an existing Ray cluster), not both.")
        if workers is not None and workers < 1:
            raise KDConfigError(f"--workers must be at least 1, got {workers}.")
        if cpus_per_run <= 0 or gpus_per_run < 0:
            raise KDConfigError(f"--cpus-per-run must be > 0 and --gpus-per-run >= 0, got "
                                f"{cpus_per_run} and {gpus_per_run}.")
        if workers is not None and cpus_per_run > workers:
            raise KDConfigError(f"--cpus-per-run {cpus_per_run} is more than the {workers} CPUs "
                                f"of --workers {workers}; no run could start.")
        self.ray = import_ray()
        self.workers, self.address = workers, address
        self.cpus, self.gpus = cpus_per_run, gpus_per_run
        #: torch/OpenMP threads of a run: its whole CPUs (at least one)
        self.threads = max(1, int(cpus_per_run))
        self._remote = None
        self._started = False
        self._have: dict[str, float] = {}

    def __enter__(self) -> "RayRuns":
        ray = self.ray
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        if self.workers is not None:
            # the workers import this same kd_lightning, wherever the driver imported it from
            here = str(Path(kd_lightning.__file__).resolve().parents[1])
            paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if here not in paths:
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, *paths) if p)
            self._start(dict(address="local", num_cpus=self.workers, **quiet))
        else:
            self._start(dict(address=self.address, **quiet))
        have = ray.cluster_resources()
        for name, need, flag in (("CPU", self.cpus, "--cpus-per-run"),
                                 ("GPU", self.gpus, "--gpus-per-run")):
            if need > have.get(name, 0):
                self.__exit__(None, None, None)
                raise KDConfigError(f"{flag} {need} asks for more {name}s than the Ray cluster has "
                                    f"({have.get(name, 0):g}); no run could start.")
        self._have = have
        # a run that fails is recorded as failed (a rerun of the study tries it again): not
        # retried by Ray, so a crash costs one run's time and says so
        self._remote = ray.remote(run_cell).options(num_cpus=self.cpus, num_gpus=self.gpus,
                                                    max_retries=0)
        return self

    def _start(self, kwargs: dict, attempts: int = 3) -> None:
        """``ray.init``, tried again when a busy machine makes a local instance miss Ray's startup
        deadlines (its node manager waits a fixed time for its agents)."""
        ray = self.ray
        for attempt in range(attempts):
            try:
                ray.init(**kwargs)
                break
            except Exception:  # noqa: BLE001 - Ray raises plain Exception on a startup timeout
                ray.shutdown()
                if kwargs["address"] != "local" or attempt == attempts - 1:
                    raise
        self._started = True

    def __exit__(self, *exc) -> None:
        if self._started:
            self._started = False
            self.ray.shutdown()

    def slots(self) -> int:
        """How many runs the cluster holds at once (its CPUs and GPUs over a run's)."""
        have = self._have
        n = have.get("CPU", 0) / self.cpus
        if self.gpus:
            n = min(n, have.get("GPU", 0) / self.gpus)
        return max(1, int(n + 1e-9))

    def window(self) -> int:
        """How many runs the driver keeps submitted: every slot busy and as many queued, so a
        worker that finishes starts its next run without waiting for the driver, while the
        order of the rest is still the driver's to choose (see
        :class:`kd_lightning.study.runner.LongestFirst`)."""
        return 2 * self.slots()

    def describe(self) -> str:
        where = f"a local Ray instance with {self.workers} CPUs" if self.workers is not None \
            else f"the Ray cluster at {self.address}"
        gpus = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"running on {where}: {self.cpus:g} CPU{gpus} per run"

    def submit(self, args: list[str], log_file: Path, isolate: bool, *, validate: bool = False,
               save_weights: Path | None = None):
        """Start a run; returns its handle (a Ray object reference)."""
        return self._remote.remote(list(args), str(log_file), isolate, self.threads, validate,
                                   None if save_weights is None else str(save_weights))

    def next(self, pending) -> tuple[Any, dict[str, Any]]:
        """Wait for the first of ``pending`` handles to finish: ``(handle, result)``, the result
        as :func:`run_cell` returns it; a worker that died is an ``error`` result."""
        ray = self.ray
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        try:
            return ref, ray.get(ref)
        except ray.exceptions.RayError as err:
            first = (str(err).strip().splitlines() or [""])[0]
            return ref, {"error": f"the Ray worker running it failed ({type(err).__name__}: "
                                  f"{first})"}

    def run(self, args: list[str], log_file: Path, isolate: bool, **kwargs) -> dict[str, Any]:
        """One run, waited for."""
        return self.next([self.submit(args, log_file, isolate, **kwargs)])[1]

    def cancel(self, pending) -> None:
        for ref in pending:
            self.ray.cancel(ref, force=True)
