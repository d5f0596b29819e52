"""Where a study's runs execute: one after another here, or as Ray tasks. Both take a run with
``submit(plan)`` while ``room()`` is positive and yield ``(plan, outcome)`` from ``results()`` as
runs finish; the outcome (:func:`execute`) is a :class:`~kd_lightning.jobs.JobResult` or a
:class:`~kd_lightning.jobs.JobFailed`. On Ray the driver alone writes results.csv; on a cluster
the study folder and teacher cache must be on a file system every node sees.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

from kd_lightning import KDConfigError, jobs
from kd_lightning.study.spec import require


def execute(run: list[jobs.Job]) -> jobs.JobResult | jobs.JobFailed:
    """The jobs of one run, in order: the last one's result with the seconds of all, or the
    failure of the first that failed."""
    try:
        results = [jobs.run_job(job) for job in run]
    except jobs.JobFailed as err:
        return err
    results[-1].seconds = sum(r.seconds for r in results)
    results[-1].resumed_epochs = max(r.resumed_epochs for r in results)
    return results[-1]


class SequentialExecutor(contextlib.AbstractContextManager):
    """Runs one after another in this process, in the order submitted (each is started when
    ``results()`` reaches it)."""

    concurrent, window = False, 1

    def __init__(self) -> None:
        self.pending: dict = {}  # a run's handle (here its id; a Ray task's reference) -> its plan

    def __exit__(self, *exc) -> None:
        self.pending.clear()

    def room(self) -> int:
        return self.window - len(self.pending)

    def submit(self, plan) -> None:
        self.pending[id(plan)] = plan

    def results(self):
        while self.pending:
            plan = self.pending.pop(next(iter(self.pending)))
            yield plan, execute(plan.jobs)


def _ray_task(run: list[jobs.Job], threads: int):
    """One run in a Ray worker, its torch and OpenMP threads (a subprocess run's too, through
    OMP_NUM_THREADS) set to the task's CPUs."""
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    jobs.quiet_lightning()
    return execute(run)


class RayExecutor(SequentialExecutor):
    """Runs as Ray tasks with declared resources (a GPU fraction lets runs share one): ``workers``
    starts a local Ray instance with that many CPUs (shut down at the end), ``address`` joins a
    cluster (``auto``: the one this node belongs to)."""

    concurrent = True

    def __init__(self, workers: int | None = None, address: str | None = None,
                 cpus_per_run: float = 1.0, gpus_per_run: float = 0.0) -> None:
        require((workers is None) != (address is None), "give either --workers N (a local Ray "
                "instance) or --address ADDR (an existing Ray cluster), not both.")
        require(workers is None or workers >= 1, f"--workers must be at least 1, got {workers}.")
        require(cpus_per_run > 0 and gpus_per_run >= 0, f"--cpus-per-run must be > 0 and --gpus-per-run >= 0, "
                f"got {cpus_per_run} and {gpus_per_run}.")
        require(workers is None or cpus_per_run <= workers, f"--cpus-per-run {cpus_per_run} is more than the "
                f"{workers} CPUs of --workers {workers}; no run could start.")
        try:
            import ray
        except ImportError:
            raise KDConfigError("--workers and --address run the study on Ray, which is not installed; install "
                                "it with `pip install kd_lightning[ray]` (or run the study sequentially, "
                                "without --workers/--address).") from None
        super().__init__()
        self.ray, self.workers, self.address, self.cpus, self.gpus = ray, workers, address, cpus_per_run, gpus_per_run
        self._started = False

    def __enter__(self):
        ray, kwargs = self.ray, dict(address=self.address, include_dashboard=False, log_to_driver=False,
                                     logging_level=logging.ERROR)
        if self.workers is not None:
            # the workers import this same kd_lightning, wherever the driver imported it from
            here = str(Path(jobs.__file__).resolve().parents[1])
            paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if here not in paths:
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, *paths) if p)
            kwargs.update(address="local", num_cpus=self.workers)
        for attempt in range(3):  # a busy machine can make a local instance miss Ray's deadlines
            try:
                ray.init(**kwargs)
                break
            except Exception:  # noqa: BLE001 - Ray raises plain Exception on a startup timeout
                ray.shutdown()
                if self.workers is None or attempt == 2:
                    raise
        self._started = True
        have = ray.cluster_resources()
        for name, need, flag in (("CPU", self.cpus, "--cpus-per-run"), ("GPU", self.gpus, "--gpus-per-run")):
            if need > have.get(name, 0):
                self.__exit__()
                raise KDConfigError(f"{flag} {need} asks for more {name}s than the Ray cluster has "
                                    f"({have.get(name, 0):g}); no run could start.")
        slots = min(have.get("CPU", 0) / self.cpus, have.get("GPU", 0) / self.gpus if self.gpus else math.inf)
        # every slot busy and as many queued: a worker that finishes starts its next run at once,
        # while the order of the rest is still the driver's to choose
        self.window = 2 * max(1, int(slots + 1e-9))
        # a failed run is recorded as failed (a rerun of the study tries it again), not retried
        self._remote = ray.remote(_ray_task).options(num_cpus=self.cpus, num_gpus=self.gpus,
                                                     max_retries=0)
        return self

    def __exit__(self, *exc) -> None:
        for ref in self.pending:  # stopped, interrupted, or the teacher failed
            self.ray.cancel(ref, force=True)
        self.pending.clear()
        if self._started:
            self._started = False
            self.ray.shutdown()

    def describe(self) -> str:
        where = f"a local Ray instance with {self.workers} CPUs" if self.workers is not None \
            else f"the Ray cluster at {self.address}"
        return f"running on {where}: {self.cpus:g} CPU{f', {self.gpus:g} GPU' if self.gpus else ''} per run"

    def submit(self, plan) -> None:
        self.pending[self._remote.remote(plan.jobs, max(1, int(self.cpus)))] = plan

    def results(self):
        while self.pending:
            (ref,), _ = self.ray.wait(list(self.pending), num_returns=1)
            plan = self.pending.pop(ref)
            try:
                outcome = self.ray.get(ref)
            except self.ray.exceptions.RayError as err:
                first = (str(err).strip().splitlines() or [""])[0]
                outcome = jobs.JobFailed(f"the Ray worker running it failed ({type(err).__name__}: {first})")
            yield plan, outcome
