"""Few-data study on MNIST-1D: the student alone, ResponseKD and WassersteinKD, Kong et al.'s layout.

For every M (labelled training examples the student sees) and seed, each method is trained
through the real CLI (``kd-lightning fit``) from its config, with::

    --seed_everything s --data.subset_seed s --data.train_subset M

and the same optimisation budget for every method and every M: ``--steps`` optimizer steps
(default 1500; batch 100, so M = 50 and 100 take one step per epoch, M = 1000 ten), the cosine
schedule of the configs stretched over them (``T_max`` = epochs), validation every ~30 steps
on the fixed 400 held-out examples. The teacher (``configs/mnist1d/teacher.yaml``, trained on
the full training split) is trained first if its checkpoint is missing.

Two test accuracies are recorded per run: the checkpoint with the best validation accuracy (what
``kd-lightning fit`` tests by default) and the last checkpoint (no use of validation labels).
The script prints markdown tables in Kong et al.'s (2020) layout (rows M, columns methods,
mean ± std over seeds, test accuracy in %) and writes ``results.md``, ``results.csv`` and one
JSON file per run under ``--out`` (runs already there are not repeated). Each run is a separate
process with one thread; ``--jobs`` of them run at once (default 2)::

    python benchmarks/few_data_mnist1d.py                       # the README table (about 15 min)
    python benchmarks/few_data_mnist1d.py --ms 100 500 --seeds 0 1 --methods wasserstein --eps 0.3 1 2 3 10  # eps sweep
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "mnist1d"
TEACHER = "runs/mnist1d_teacher/checkpoints/best.ckpt"  # relative to the repository
BATCH = 100
VAL_EVERY_STEPS = 30


def method_specs(eps_values: list[float], methods: list[str]) -> list[dict]:
    specs = []
    for m in methods:
        if m == "wasserstein":
            for eps in eps_values:
                specs.append({"key": f"wasserstein_eps{eps:g}", "label": f"WassersteinKD (eps={eps:g})",
                              "config": "wasserstein.yaml", "extra": ["--model.init_args.eps", str(eps)]})
        elif m == "response":
            specs.append({"key": "response", "label": "ResponseKD", "config": "response.yaml", "extra": []})
        elif m == "student":
            specs.append({"key": "student", "label": "Student alone", "config": "student.yaml", "extra": []})
        elif m == "relation":
            specs.append({"key": "relation", "label": "RelationKD", "config": "relation.yaml", "extra": []})
        else:
            raise SystemExit(f"unknown method {m!r}: use student, response, wasserstein, relation")
    return specs


def cli_args(spec: dict, m: int, seed: int, steps: int, out: Path, teacher: str) -> list[str]:
    per_epoch = math.ceil(m / BATCH)
    epochs = max(1, steps // per_epoch)
    val_every = max(1, round(VAL_EVERY_STEPS / per_epoch))
    args = ["fit", "--config", str(CONFIGS / spec["config"]),
            "--seed_everything", str(seed), "--data.subset_seed", str(seed),
            "--data.train_subset", str(m), "--data.batch_size", str(BATCH),
            "--trainer.max_epochs", str(epochs),
            "--model.init_args.lr_scheduler.init_args.T_max", str(epochs),
            "--trainer.check_val_every_n_epoch", str(val_every),
            "--trainer.logger.init_args.save_dir", str(out / "tb"),
            "--trainer.logger.init_args.name", f"{spec['key']}_m{m}_s{seed}",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            *spec["extra"]]
    if spec["key"] != "student":
        args += ["--model.init_args.teacher_checkpoint", teacher]
    return args


def worker(job: dict) -> None:
    """One run, in this process: fit, test the final weights, then the best-validation checkpoint.

    (The CLI's ``last.ckpt`` is only rewritten when a new best checkpoint is saved, so the final
    weights are tested from memory, before the best checkpoint is loaded.)"""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    from kd_lightning.cli import cli_main

    start = time.perf_counter()
    cli = cli_main([*job["args"], "--test_after_fit", "false"])
    trainer = cli.trainer
    last = trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/acc"]
    best = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)[0]["test/acc"]
    ckpt_cb = trainer.checkpoint_callback
    result = {**{k: job[k] for k in ("key", "label", "m", "seed")},
              "test_acc_best_val": float(best), "test_acc_last": float(last),
              "best_val_acc": float(ckpt_cb.best_model_score), "steps": cli.trainer.global_step,
              "seconds": round(time.perf_counter() - start, 1), "command": "kd-lightning " + " ".join(job["args"])}
    Path(job["result"]).write_text(json.dumps(result))


def ensure_teacher() -> str:
    path = REPO / TEACHER
    if not path.is_file():
        print(f"training the teacher ({TEACHER}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "kd_lightning.cli", "fit", "--config", str(CONFIGS / "teacher.yaml"),
                        "--trainer.enable_progress_bar", "false"], cwd=REPO, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    return str(path)


def table(rows: list[dict], specs: list[dict], ms: list[int], field: str) -> str:
    head = "| M | " + " | ".join(s["label"] for s in specs) + " |"
    lines = [head, "|---" * (len(specs) + 1) + "|"]
    for m in ms:
        cells = []
        for s in specs:
            accs = [100 * r[field] for r in rows if r["key"] == s["key"] and r["m"] == m]
            if not accs:
                cells.append("")
            elif len(accs) == 1:
                cells.append(f"{accs[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=int, nargs="+", default=[50, 100, 500, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["wasserstein", "response", "student"])
    parser.add_argument("--eps", type=float, nargs="+", default=[2.0], help="WassersteinKD radii")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "few_data_mnist1d")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(json.loads(opts.worker))
        return
    out = opts.out.resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    teacher = ensure_teacher()
    specs = method_specs(opts.eps, opts.methods)
    jobs = []
    for m in opts.ms:
        for seed in opts.seeds:
            for spec in specs:
                result = out / "results" / f"{spec['key']}_m{m}_s{seed}_steps{opts.steps}.json"
                jobs.append({"key": spec["key"], "label": spec["label"], "m": m, "seed": seed,
                             "result": str(result), "args": cli_args(spec, m, seed, opts.steps, out, teacher)})
    todo = [j for j in jobs if not Path(j["result"]).is_file()]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done; {opts.jobs} at once", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = 0
    start = time.perf_counter()

    def launch(job: dict) -> None:
        nonlocal done
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], cwd=REPO, env=env,
                              capture_output=True, text=True)
        done += 1
        status = "ok" if proc.returncode == 0 else f"FAILED:\n{proc.stderr[-2000:]}"
        print(f"[{done}/{len(todo)} {time.perf_counter() - start:6.0f}s] {job['key']} M={job['m']} "
              f"seed={job['seed']}: {status}", flush=True)

    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        list(pool.map(launch, todo))
    rows = [json.loads(Path(j["result"]).read_text()) for j in jobs if Path(j["result"]).is_file()]
    with open(out / "results.csv", "w", newline="") as f:
        fields = ["key", "label", "m", "seed", "test_acc_best_val", "test_acc_last", "best_val_acc",
                  "steps", "seconds", "command"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r[k] for k in fields} for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    text = (f"MNIST-1D, MLP 40-100-100-10 student, ConvNet1D (width 64) teacher; test accuracy (%), "
            f"mean ± std over seeds {opts.seeds}; {opts.steps} optimizer steps per run.\n\n"
            f"Checkpoint with the best validation accuracy:\n\n{table(rows, specs, opts.ms, 'test_acc_best_val')}\n\n"
            f"Last checkpoint:\n\n{table(rows, specs, opts.ms, 'test_acc_last')}\n\n"
            f"Validation accuracy of the selected checkpoint:\n\n{table(rows, specs, opts.ms, 'best_val_acc')}\n\n"
            f"{len(rows)} runs, {seconds / 60:.1f} min of run time in all.\n")
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
