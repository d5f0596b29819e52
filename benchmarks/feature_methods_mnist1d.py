"""Feature-based distillation on MNIST-1D with few labelled examples: the results table.

Trains the MNIST-1D teacher once (configs/mnist1d/teacher.yaml, full training split), then for
each seed trains the student alone (configs/mnist1d/student_cnn.yaml) and distils the teacher into
the same student with FitNet, FSP, ActivationBoundary and AttentionTransfer
(configs/mnist1d/{fitnet,fsp,ab,at}.yaml), and, for reference, with Hinton KD
(configs/mnist1d/response.yaml with the same CNN student), each on a stratified subset of M training examples
(``--data.train_subset M --data.subset_seed s --seed_everything s``). Every run is the plain
``kd-lightning fit`` command printed below (the test accuracy is that of the best checkpoint by
validation accuracy, tested after fitting). Writes ``results.md`` and ``results.csv`` in the output
directory and prints the table (per seed, mean and standard deviation).

Runs are independent processes (``--jobs`` at a time, each with ``OMP_NUM_THREADS=1``); finished
runs are skipped when the script is run again with the same ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/feature_methods_mnist1d.py --out runs/feature_bench
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "mnist1d"
CNN_STUDENT = ["--model.init_args.student", "kd_lightning.models.ConvNet1D",
               "--model.init_args.student.init_args.width", "64",
               "--model.init_args.student.init_args.groups", "4"]
METHODS = {  # row name -> (config, extra arguments)
    "student alone": ("student_cnn.yaml", []),
    # reference: Hinton KD into the same CNN student (response.yaml distils into the MLP)
    "KD (Hinton)": ("response.yaml", CNN_STUDENT),
    "FitNet": ("fitnet.yaml", []),
    "FSP": ("fsp.yaml", []),
    "AB": ("ab.yaml", []),
    "AT": ("at.yaml", []),
}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def run(cmd: list[str], cwd: Path, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {shlex.join(cmd)}; see {log}")


def test_accuracy(log_dir: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return float(acc.Scalars("test/acc")[-1].value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/feature_bench", help="working directory of all runs")
    p.add_argument("--m", type=int, default=500, help="labelled training examples (train_subset)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    args = p.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "kd_lightning.cli"]
    teacher = out / "runs/mnist1d_teacher/checkpoints/best.ckpt"
    if not teacher.is_file():
        cmd = [*exe, "fit", "--config", str(CONFIGS / "teacher.yaml"), *QUIET]
        print("$", shlex.join(["kd-lightning", *cmd[3:]]), flush=True)
        run(cmd, out, out / "teacher.log")

    jobs = []
    for seed in args.seeds:
        for method in args.methods:
            cfg, extra = METHODS[method]
            name = f"m{args.m}_{Path(cfg).stem}{'_cnn' if extra else ''}_s{seed}"
            cmd = [*exe, "fit", "--config", str(CONFIGS / cfg), "--seed_everything", str(seed),
                   "--data.train_subset", str(args.m), "--data.subset_seed", str(seed),
                   "--trainer.logger.init_args.save_dir", "runs",
                   "--trainer.logger.init_args.name", name,
                   "--trainer.logger.init_args.version", "0", *extra, *QUIET]
            if method != "student alone":
                cmd += ["--model.init_args.teacher_checkpoint", str(teacher)]
            jobs.append((method, seed, name, cmd))

    def work(job):
        method, seed, name, cmd = job
        done = out / "results" / f"{name}.json"
        if done.is_file():
            return json.loads(done.read_text())
        log_dir = out / "runs" / name / "version_0"
        if log_dir.exists():  # an interrupted run: start it afresh
            import shutil

            shutil.rmtree(log_dir)
        start = time.time()
        run(cmd, out, out / f"{name}.log")
        res = {"method": method, "seed": seed, "m": args.m, "test_acc": test_accuracy(log_dir),
               "seconds": round(time.time() - start, 1),
               "command": shlex.join(["kd-lightning", *cmd[3:]])}
        done.parent.mkdir(exist_ok=True)
        done.write_text(json.dumps(res))
        print(f"{method:14s} seed {seed}: test acc {100 * res['test_acc']:.2f}%  "
              f"({res['seconds']:.0f} s)", flush=True)
        return res

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(work, jobs))

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", "m", "test_acc", "seconds", "command"])
        w.writeheader()
        w.writerows(results)
    by = {(r["method"], r["seed"]): 100 * r["test_acc"] for r in results}
    lines = [f"MNIST-1D, M = {args.m} labelled examples, test accuracy (%) of the best-validation "
             f"checkpoint; teacher ConvNet1D width 64 on the full training split.", "",
             "| method | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± std |",
             "|---|" + "---|" * (len(args.seeds) + 1)]
    for method in args.methods:
        vals = [by[(method, s)] for s in args.seeds]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {method} | " + " | ".join(f"{v:.2f}" for v in vals)
                     + f" | {statistics.mean(vals):.2f} ± {std:.2f} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
