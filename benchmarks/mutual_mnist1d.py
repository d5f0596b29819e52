"""MutualDistillation on MNIST-1D: the student alone vs. rule knowledge as the teacher.

For every training budget M (100, 500, full) and seed, trains through the ``kd-lightning`` CLI
(one subprocess per run):

* ``student``   -- configs/mnist1d/student.yaml (no knowledge);
* ``fixed``     -- configs/mnist1d/mutual_fixed.yaml (template rule, lambda learned);
* ``fixed_handset`` -- the same with ``learn_lambda: false`` (lambda = 1 throughout, the ACL 2016
  setting);
* ``learnable`` -- configs/mnist1d/mutual_learnable.yaml (templates + sharpness learned as phi);
* ``wrong``     -- configs/mnist1d/mutual_wrong.yaml (templates permuted among classes);

and prints a markdown table of test accuracy (mean ± std over seeds) of the student ``p``, the
teacher ``q`` and the rules alone, plus ``lambda`` at the end of training. Every run tests the
checkpoint with the best validation accuracy of the student (the CLI's ``test_after_fit``); ``p``,
``q`` and the rule columns come from that checkpoint. Because ``q`` is a model of its own (it needs
the rules at test time), each MutualDistillation run also keeps the checkpoint with the best
``val/acc_q`` and tests it (``kd-lightning test --ckpt_path ...``): column "q, own best
checkpoint".

Budgets and steps: batch 100 everywhere; the full set runs ``--full-epochs`` epochs (36 steps
each), the subsets run ``--subset-steps`` optimizer steps in all (M = 100: one step per epoch;
M = 500: five), with the cosine schedule over the whole run. The subset and the initialisation
both follow the seed (``--data.subset_seed`` and ``--seed_everything``).

Run (one thread; the default table took 19 minutes on a shared 2-core CPU)::

    OMP_NUM_THREADS=1 python benchmarks/mutual_mnist1d.py
    python benchmarks/mutual_mnist1d.py --budgets 100 --seeds 0 --variants student fixed  # a slice

Runs are written under ``--out`` (default ``runs/bench_mutual``); a run whose TensorBoard log
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
    "fixed": "configs/mnist1d/mutual_fixed.yaml",
    "fixed_handset": "configs/mnist1d/mutual_fixed.yaml",
    "learnable": "configs/mnist1d/mutual_learnable.yaml",
    "wrong": "configs/mnist1d/mutual_wrong.yaml",
}
LABELS = {"student": "student alone", "fixed": "fixed rule", "learnable": "learnable rule",
          "wrong": "wrong rule", "fixed_handset": "fixed rule, lambda = 1 hand-set"}
#: extra CLI arguments of a variant
EXTRA = {"fixed_handset": ["--model.init_args.learn_lambda", "false"]}
TAGS = ["test/acc", "test/acc_q", "test/acc_rule", "train/lambda_0"]


def run_args(variant: str, budget: str, seed: int, epochs: int, out: Path, check_every: int,
             command: str = "fit", name: str | None = None) -> list[str]:
    name = name or f"{variant}_m{budget}_s{seed}"
    args = [command, "--config", str(REPO / CONFIGS[variant]), "--seed_everything", str(seed),
            "--trainer.max_epochs", str(epochs),
            "--model.init_args.lr_scheduler.init_args.T_max", str(epochs),
            "--trainer.check_val_every_n_epoch", str(check_every),
            "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.root", str(REPO / "data")]
    if budget != "full":
        args += ["--data.train_subset", budget, "--data.subset_seed", str(seed)]
    if command == "fit" and variant != "student":  # also keep the checkpoint where q is best
        args += ["--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.monitor", "val/acc_q", "--trainer.callbacks.mode", "max",
                 "--trainer.callbacks.filename", "best_q-{epoch}"]
    return args + EXTRA.get(variant, [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", default=["100", "500", "full"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--full-epochs", type=int, default=150)
    ap.add_argument("--subset-steps", type=int, default=1500)
    ap.add_argument("--out", default="runs/bench_mutual")
    ap.add_argument("--lambda-objective", choices=["mean_q", "mean_log_q"], default=None,
                    help="Eq. 6 form of the MutualDistillation runs (default: the method's, mean_q)")
    args = ap.parse_args()
    if args.lambda_objective:
        for variant in CONFIGS:
            if variant != "student":
                EXTRA[variant] = EXTRA.get(variant, []) + ["--model.init_args.lambda_objective",
                                                           args.lambda_objective]
    out = Path(args.out).resolve()
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    started = time.time()
    for budget in args.budgets:
        if budget == "full":
            epochs, check_every = args.full_epochs, 1
        else:
            epochs = max(1, round(args.subset_steps / math.ceil(int(budget) / 100)))
            check_every = max(1, epochs // 150)  # about 150 validations per run
        for variant in args.variants:
            for seed in args.seeds:
                name = f"{variant}_m{budget}_s{seed}"
                log_dir = out / name / "version_0"
                q_dir = out / f"{name}_qbest" / "version_0"
                scalars = read_scalars(log_dir, TAGS)
                q_scalars = read_scalars(q_dir, TAGS) if variant != "student" else {}
                if "test/acc" not in scalars or (variant != "student" and "test/acc_q" not in q_scalars):
                    t0 = time.time()
                    run(run_args(variant, budget, seed, epochs, out, check_every), env)
                    scalars = read_scalars(log_dir, TAGS)
                    if variant != "student":  # test the checkpoint with the best val/acc_q as well
                        best_q = next((log_dir / "checkpoints").glob("best_q-*.ckpt"))
                        run(run_args(variant, budget, seed, epochs, out, check_every, "test",
                                     f"{name}_qbest") + ["--ckpt_path", str(best_q)], env)
                        q_scalars = read_scalars(q_dir, TAGS)
                    print(f"[{time.time() - started:6.0f}s] M={budget:>4} {variant:<13} seed {seed}: "
                          + ", ".join(f"{k}={v:.4f}" for k, v in scalars.items())
                          + (f", q at its best ckpt={q_scalars['test/acc_q']:.4f}" if q_scalars else "")
                          + f" ({time.time() - t0:.0f}s)", flush=True)
                if q_scalars:
                    scalars["q_best"] = q_scalars["test/acc_q"]
                results.setdefault((budget, variant), []).append(scalars)

    print(f"\nMNIST-1D test accuracy (%), MLP 40-100-100-10 student, mean ± std over seeds "
          f"{args.seeds}; full set {args.full_epochs} epochs, subsets {args.subset_steps} steps.\n")
    print("| M | method | student p | teacher q | q, own best checkpoint | rule alone | lambda at end |")
    print("|---|---|---|---|---|---|---|")
    for budget in args.budgets:
        for variant in args.variants:
            runs = results.get((budget, variant), [])
            get = lambda tag: [r[tag] for r in runs if tag in r]  # noqa: E731
            row = [budget if budget == "full" else f"{budget}", LABELS[variant], mean_std(get("test/acc"))]
            row += [mean_std(get("test/acc_q")), mean_std(get("q_best")), mean_std(get("test/acc_rule")),
                    mean_std(get("train/lambda_0"), scale=1.0, digits=2)] if variant != "student" \
                else ["–", "–", "–", "–"]
            print("| " + " | ".join(row) + " |")
    print(f"\ntotal time {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
