"""The fixed cost of one study run: what a cell of ``kd-lightning-study`` costs besides its steps.

Runs a study of one-step cells in this process, as ``kd-lightning-study`` runs them (the
MNIST-1D teacher of ``configs/mnist1d/teacher.yaml``, the methods given, M=100, full test
split), and prints the mean CPU and wall time per cell; with ``--profile`` also the functions
where that CPU time goes (cProfile on process time, cumulative). The teacher is trained once first (or taken from
``--teacher-cache``) and is not counted.

    python benchmarks/study_fixed_cost.py --runs 8
    python benchmarks/study_fixed_cost.py --runs 8 --profile 25
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CNN_STUDENT = ["--model.init_args.student", "kd_lightning.models.ConvNet1D",
               "--model.init_args.student.init_args.width", "64",
               "--model.init_args.student.init_args.groups", "4"]
METHODS = {
    "student": {"name": "student alone", "config": "configs/mnist1d/student_cnn.yaml"},
    "kd": {"name": "KD", "config": "configs/mnist1d/response.yaml", "args": CNN_STUDENT},
    "fitnet": {"name": "FitNet", "config": "configs/mnist1d/fitnet.yaml"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="timed cells (seeds x methods)")
    parser.add_argument("--methods", nargs="+", default=["student", "kd"], choices=list(METHODS))
    parser.add_argument("--teacher-cache", default=str(REPO / "studies" / "_teachers"))
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N functions with the most cumulative time")
    opts = parser.parse_args()

    from kd_lightning.study.runner import StudyRunner
    from kd_lightning.study.spec import load_study

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    seeds = max(1, -(-opts.runs // len(opts.methods)))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"name": "fixed-cost", "teacher": {"config": str(REPO / "configs/mnist1d/teacher.yaml")},
               "budgets": [100], "seeds": list(range(seeds + 1)), "steps": 1,
               "methods": [{**METHODS[m], "config": str(REPO / METHODS[m]["config"])}
                           for m in opts.methods]}
        path = Path(tmp) / "study.yaml"
        path.write_text(yaml.safe_dump(cfg))
        spec = load_study(path)
        warm = StudyRunner(spec, Path(tmp) / "warm", [], False, Path(opts.teacher_cache),
                           progress=False)
        spec.seeds = [seeds]  # one untimed cell per method: the teacher, imports, first calls
        warm.run()
        spec.seeds = list(range(seeds))
        runner = StudyRunner(spec, Path(tmp) / "out", [], False, Path(opts.teacher_cache),
                             progress=False)
        profile = cProfile.Profile(time.process_time) if opts.profile else None
        wall, cpu = time.perf_counter(), time.process_time()
        if profile:
            profile.enable()
        runner.run()
        if profile:
            profile.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        n = len(runner.results.rows())
    print(json.dumps({"cells": n, "cpu_s_per_cell": round(cpu / n, 3),
                      "wall_s_per_cell": round(wall / n, 3)}))
    if profile:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(opts.profile)
        print(out.getvalue())


if __name__ == "__main__":
    main()
