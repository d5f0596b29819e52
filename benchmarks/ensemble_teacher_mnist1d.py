"""ResponseKD on MNIST-1D from an ensemble of three CNN teachers vs. from one of them.

Steps, all through the ``kd-lightning`` CLI (driven in-process, one run after another), from the
repository root:

1. the three teacher members, with the commands of configs/mnist1d/response_ensemble.yaml:
   configs/mnist1d/teacher.yaml (seed 0, ``runs/mnist1d_teacher/checkpoints/best.ckpt``) and
   configs/mnist1d/teacher_member.yaml with seeds 1 and 2
   (``runs/mnist1d_teacher_member/seed{1,2}/checkpoints/best.ckpt``); a member whose checkpoint
   exists is not trained again;
2. the test accuracy of each member and of their ensemble (kd_lightning.models.EnsembleTeacher,
   ``average="probs"``: the mean softmax), computed here on the test split of DistillDataModule;
3. the MLP student of configs/mnist1d/response.yaml (ResponseKD, T = 4, kd_weight 0.9, ce_weight
   0.1) from the seed-0 teacher alone (``single``) and from the ensemble
   (configs/mnist1d/response_ensemble.yaml, ``ensemble``), for every seed (``--seed_everything``
   sets the student's initialisation and the batch order). Each student run tests its checkpoint
   with the best validation accuracy (the CLI's ``test_after_fit``).

and prints a markdown table of test accuracy (mean ± std over seeds for the students).

Run (one thread)::

    OMP_NUM_THREADS=1 python benchmarks/ensemble_teacher_mnist1d.py
    python benchmarks/ensemble_teacher_mnist1d.py --seeds 0 --variants ensemble  # a slice
    python benchmarks/ensemble_teacher_mnist1d.py --student-epochs 50            # shorter students

Student runs are written under ``--out`` (default ``runs/bench_ensemble``); a run whose
TensorBoard log already holds ``test/acc`` is not run again, so an interrupted table resumes and
several slices can run side by side. ``--teacher-epochs`` other than 60 (the configs') changes the
teachers, so delete their checkpoints first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHERS = {  # seed -> (config, extra CLI arguments, checkpoint written)
    0: ("configs/mnist1d/teacher.yaml", [], "runs/mnist1d_teacher/checkpoints/best.ckpt"),
    1: ("configs/mnist1d/teacher_member.yaml", ["--trainer.logger.init_args.version", "seed1"],
        "runs/mnist1d_teacher_member/seed1/checkpoints/best.ckpt"),
    2: ("configs/mnist1d/teacher_member.yaml", ["--trainer.logger.init_args.version", "seed2"],
        "runs/mnist1d_teacher_member/seed2/checkpoints/best.ckpt"),
}
STUDENTS = {"single": "configs/mnist1d/response.yaml",
            "ensemble": "configs/mnist1d/response_ensemble.yaml"}
LABELS = {"single": "ResponseKD from the seed-0 teacher",
          "ensemble": "ResponseKD from the 3-teacher ensemble (mean softmax)"}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def fit(args: list[str]) -> None:
    from kd_lightning.cli import cli_main

    cli_main(["fit", *args, *QUIET])


def test_scalar(log_dir: Path, tag: str = "test/acc") -> float | None:
    """Last value of ``tag`` in a run's TensorBoard log (None if there is none)."""
    if not log_dir.is_dir():
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag)[-1].value if tag in acc.Tags()["scalars"] else None


def test_accuracy(model) -> float:
    """Top-1 accuracy of ``model`` (inputs -> logits) on the MNIST-1D test split."""
    import torch

    from kd_lightning.data import DistillDataModule

    dm = DistillDataModule(dataset="mnist1d", root=str(REPO / "data"))
    dm.setup("test")
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y, _ in dm.test_dataloader():
            correct += (model(x).argmax(-1) == y).sum().item()
            total += y.numel()
    return correct / total


def mean_std(values: list[float]) -> str:
    m = statistics.fmean(values) * 100
    s = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
    return f"{m:.1f} ± {s:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="student seeds")
    ap.add_argument("--variants", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    ap.add_argument("--teacher-epochs", type=int, default=60)
    ap.add_argument("--student-epochs", type=int, default=150)
    ap.add_argument("--out", default="runs/bench_ensemble")
    args = ap.parse_args()
    os.chdir(REPO)  # the configs' checkpoint paths are relative to the repository root
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    started = time.time()

    from kd_lightning.models import ConvNet1D, EnsembleTeacher
    from kd_lightning.models.weights import load_teacher_weights

    for seed, (config, extra, ckpt) in TEACHERS.items():
        if not Path(ckpt).is_file():
            e = str(args.teacher_epochs)
            fit(["--config", config, "--seed_everything", str(seed), *extra, "--trainer.max_epochs", e,
                 "--model.init_args.lr_scheduler.init_args.T_max", e])
            print(f"[{time.time() - started:6.0f}s] teacher seed {seed} trained", flush=True)

    out = Path(args.out)
    results: dict[str, list[float]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            log_dir = out / f"{variant}_s{seed}" / "version_0"
            acc = test_scalar(log_dir)
            if acc is None:
                t0, e = time.time(), str(args.student_epochs)
                fit(["--config", STUDENTS[variant], "--seed_everything", str(seed),
                     "--trainer.max_epochs", e, "--model.init_args.lr_scheduler.init_args.T_max", e,
                     "--trainer.logger.init_args.save_dir", str(out),
                     "--trainer.logger.init_args.name", f"{variant}_s{seed}",
                     "--trainer.logger.init_args.version", "0"])
                acc = test_scalar(log_dir)
                print(f"[{time.time() - started:6.0f}s] {variant} seed {seed}: test/acc={acc:.4f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
            results.setdefault(variant, []).append(acc)

    members = [ConvNet1D(num_classes=10, width=64) for _ in TEACHERS]
    checkpoints = [ckpt for _, _, ckpt in TEACHERS.values()]
    for net, ckpt in zip(members, checkpoints):
        load_teacher_weights(net, ckpt)
    teacher_acc = [test_accuracy(net) for net in members]
    ensemble_acc = test_accuracy(EnsembleTeacher(
        [ConvNet1D(num_classes=10, width=64) for _ in TEACHERS], checkpoints, average="probs"))

    print(f"\nMNIST-1D test accuracy (%); teachers: ConvNet1D width 64, {args.teacher_epochs} epochs; "
          f"students: MLP 40-100-100-10, {args.student_epochs} epochs, seeds {args.seeds}.\n")
    print("| model | test acc. (%) |")
    print("|---|---|")
    for seed, acc in zip(TEACHERS, teacher_acc):
        print(f"| CNN teacher, seed {seed} | {acc * 100:.1f} |")
    print(f"| the three teachers' mean | {mean_std(teacher_acc)} |")
    print(f"| their ensemble (mean softmax) | {ensemble_acc * 100:.1f} |")
    for variant, accs in results.items():
        print(f"| {LABELS[variant]} | {mean_std(accs)} ({', '.join(f'{a * 100:.1f}' for a in accs)}) |")
    print(f"\ntotal time {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
