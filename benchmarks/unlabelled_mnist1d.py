"""Unlabelled transfer data on MNIST-1D: does distillation pay off on the inputs without labels?

For every budget M (default 100 and 500) and seed, trains the MLP 40-100-100-10 student through
the ``kd-lightning`` CLI (one subprocess per run) on the M labelled examples alone, and again with
the rest of the training split (3,600 - M examples) as unlabelled transfer data
(``--data.unlabelled rest``):

* ``student``  -- configs/mnist1d/student.yaml (labels only: the unlabelled rows add no term;
  the run with them is the control for the different batch composition);
* ``response`` -- configs/mnist1d/response.yaml (Hinton KD from the CNN teacher of
  configs/mnist1d/teacher.yaml; train that first);
* ``mutual``   -- configs/mnist1d/mutual_fixed.yaml (rule knowledge as the teacher q, lambda
  learned with Eq. 6 on the labelled rows);
* ``mutual_handset`` -- the same with ``learn_lambda: false`` (lambda = 1 throughout);
* ``mutual_learnable`` -- configs/mnist1d/mutual_learnable.yaml (not in the default table: about
  3x slower, as its rules cannot be cached).

Every run takes about ``--steps`` optimizer steps (default 1500, batch 100, cosine schedule over
the run): labels only, M = 100 is one step per epoch and M = 500 five; with the unlabelled rest,
36 steps per epoch. MutualDistillation's imitation weight ``pi_t = min(pi_0, 1 - alpha^t)``
counts epochs; with unlabelled data ``alpha`` is set to ``0.95^(steps per epoch with / without
them)``, so ``pi`` follows the same curve per optimizer step in both runs. Each run tests the
checkpoint with the best validation accuracy of the student (``test_after_fit``). Printed: test
accuracy (%) mean ± std over the seeds of the student p and, for MutualDistillation, of the
rule teacher q at that checkpoint, and the rule weight lambda at the end of training.

Run (one thread; the default table is 48 runs of 10-25 s each on a quiet core, about 15 minutes)::

    OMP_NUM_THREADS=1 python benchmarks/unlabelled_mnist1d.py
    python benchmarks/unlabelled_mnist1d.py --budgets 100 --seeds 0 --variants response  # a slice

Runs are written under ``--out`` (default ``runs/bench_unlabelled``); a run whose TensorBoard log
already holds its test metrics is not run again, so an interrupted table resumes.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from _common import mean_std, read_scalars, run  # noqa: E402 (benchmarks/)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "student": "configs/mnist1d/student.yaml",
    "response": "configs/mnist1d/response.yaml",
    "mutual": "configs/mnist1d/mutual_fixed.yaml",
    "mutual_handset": "configs/mnist1d/mutual_fixed.yaml",
    "mutual_learnable": "configs/mnist1d/mutual_learnable.yaml",
}
LABELS = {"student": "student alone", "response": "ResponseKD (CNN teacher)",
          "mutual": "MutualDistillation, fixed rule, lambda learned",
          "mutual_handset": "MutualDistillation, fixed rule, lambda = 1 hand-set",
          "mutual_learnable": "MutualDistillation, learnable rule"}
EXTRA = {"mutual_handset": ["--model.init_args.learn_lambda", "false"]}
MUTUAL = ("mutual", "mutual_handset", "mutual_learnable")
TAGS = ["test/acc", "test/acc_q", "test/teacher_acc", "train/lambda_0"]
TRAIN_SPLIT = 3600  # MNIST-1D: 4,000 training examples, 10% held out for validation


def steps_per_epoch(budget: int, unlabelled: bool, batch: int = 100) -> int:
    return math.ceil((TRAIN_SPLIT if unlabelled else budget) / batch)


def run_args(variant: str, budget: int, seed: int, unlabelled: bool, steps: int, out: Path,
             name: str) -> list[str]:
    per_epoch = steps_per_epoch(budget, unlabelled)
    epochs = max(1, round(steps / per_epoch))
    args = ["fit", "--config", str(REPO / CONFIGS[variant]), "--seed_everything", str(seed),
            "--trainer.max_epochs", str(epochs),
            "--model.init_args.lr_scheduler.init_args.T_max", str(epochs),
            "--trainer.check_val_every_n_epoch", str(max(1, epochs // 150)),
            "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.root", str(REPO / "data"),
            "--data.train_subset", str(budget), "--data.subset_seed", str(seed)]
    if unlabelled:
        args += ["--data.unlabelled", "rest"]
        if variant in MUTUAL:  # the same pi curve per optimizer step as without unlabelled data
            ratio = per_epoch / steps_per_epoch(budget, False)
            args += ["--model.init_args.pi_rate", f"{0.95 ** ratio:.6g}"]
    return args + EXTRA.get(variant, [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", type=int, default=[100, 500])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", choices=list(CONFIGS),
                    default=["student", "response", "mutual", "mutual_handset"])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default="runs/bench_unlabelled")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results: dict[tuple[int, str, bool], list[dict[str, float]]] = {}
    started = time.time()
    for budget in args.budgets:
        for variant in args.variants:
            for unlabelled in (False, True):
                for seed in args.seeds:
                    name = f"{variant}_m{budget}_{'unlabelled' if unlabelled else 'labelled'}_s{seed}"
                    log_dir = out / name / "version_0"
                    scalars = read_scalars(log_dir, TAGS)
                    if "test/acc" not in scalars:
                        t0 = time.time()
                        run(run_args(variant, budget, seed, unlabelled, args.steps, out, name), env)
                        scalars = read_scalars(log_dir, TAGS)
                        print(f"[{time.time() - started:6.0f}s] {name}: "
                              + ", ".join(f"{k}={v:.4f}" for k, v in scalars.items())
                              + f" ({time.time() - t0:.0f}s)", flush=True)
                    results.setdefault((budget, variant, unlabelled), []).append(scalars)

    teacher = [r["test/teacher_acc"] for runs in results.values() for r in runs if "test/teacher_acc" in r]
    print(f"\nMNIST-1D test accuracy (%), MLP 40-100-100-10 student, mean ± std over seeds "
          f"{args.seeds}; about {args.steps} optimizer steps per run (batch 100); \"+ unlabelled\": "
          f"the other {TRAIN_SPLIT} - M training examples without their labels"
          + (f"; CNN teacher {100 * teacher[0]:.1f}%" if teacher else "") + ".\n")
    print("| M | method | p, M labels | p, M labels + unlabelled | q, M labels | q, M labels + unlabelled "
          "| lambda, M labels | lambda, + unlabelled |")
    print("|---|---|---|---|---|---|---|---|")
    for budget in args.budgets:
        for variant in args.variants:
            get = lambda tag, u: [r[tag] for r in results.get((budget, variant, u), []) if tag in r]  # noqa: E731
            row = [str(budget), LABELS[variant], mean_std(get("test/acc", False)),
                   mean_std(get("test/acc", True)), mean_std(get("test/acc_q", False)),
                   mean_std(get("test/acc_q", True)),
                   mean_std(get("train/lambda_0", False), 1.0, 2), mean_std(get("train/lambda_0", True), 1.0, 2)]
            print("| " + " | ".join(row) + " |")
    print(f"\ntotal time {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
