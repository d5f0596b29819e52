"""Does the student inherit the teacher's calibration? MC dropout on MNIST-1D.

For each seed, trains in-process (Lightning ``Trainer``, no checkpoints, the last epoch tested):

* ``teacher``          -- an MLP with dropout (default 40-512-512-10, p = 0.5), on the training split;
* ``student alone``    -- the reference MLP 40-100-100-10 with dropout (p = 0.2), cross-entropy only;
* ``student + KD``     -- the same student distilled from the teacher with ResponseKD (T = 4,
  kd_weight 0.9, ce_weight 0.1, as configs/mnist1d/response.yaml).

Every network is tested deterministically (dropout off) and with MC dropout (Gal & Ghahramani,
"Dropout as a Bayesian Approximation", ICML 2016): the mean of ``--samples`` softmax outputs with
fresh dropout masks, batch norm (if any) in eval mode. Reported per row (mean ± std over seeds):
accuracy, expected calibration error (15 bins), negative log-likelihood and predictive entropy
(nats), each deterministic and MC, the MC entropy's two parts (expected entropy: aleatoric; mutual
information: epistemic), plus the distillation error (the course's lecture notes on distillation
error, gamma = 1) on the test set and on the students' labelled training examples, and, as this project's addition, the top-1 agreement of each
student with the teacher. All numbers come from the methods' own test-time
metrics (``mc_dropout_samples``, ``test/ece``, ``test/mc_ece``, ``test/distill_error``, ...);
the student alone is run as ``Supervised`` with the teacher attached only to be measured against.

Run (one thread; the default table takes about 3 minutes on a shared CPU core)::

    OMP_NUM_THREADS=1 python benchmarks/uncertainty_mnist1d.py
    python benchmarks/uncertainty_mnist1d.py --seeds 0 --epochs 20   # a quick look
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import pytorch_lightning as pl
import torch

from kd_lightning.data import DistillDataModule
from kd_lightning.methods import ResponseKD, Supervised
from kd_lightning.models import MLP

from _common import mean_std  # noqa: E402 (benchmarks/)

#: (column header, metric suffix, scale, digits)
COLUMNS = [("acc", "acc", 100, 1), ("ECE", "ece", 100, 1), ("NLL", "nll", 1, 3),
           ("entropy", "entropy", 1, 3), ("MC acc", "mc_acc", 100, 1), ("MC ECE", "mc_ece", 100, 1),
           ("MC NLL", "mc_nll", 1, 3), ("MC entropy", "mc_entropy", 1, 3),
           ("MC exp. entropy", "mc_expected_entropy", 1, 3), ("MC MI", "mc_mutual_info", 1, 3),
           ("distill. error", "distill_error", 100, 1), ("distill. error, train", "train_distill_error", 100, 1),
           ("agreement", "teacher_agreement", 100, 1)]
ROWS = ["teacher", "student alone", "student + KD"]


def trainer(epochs: int) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0)


def adam_cosine(lr: float, epochs: int):
    return (lambda p: torch.optim.Adam(p, lr=lr),
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs))


def run_seed(seed: int, args) -> dict[str, dict[str, float]]:
    def data() -> DistillDataModule:
        return DistillDataModule("mnist1d", root=args.root, batch_size=100, batches_per_step=10,
                                 train_subset=args.train_subset, subset_seed=seed)

    opt, sched = adam_cosine(args.lr, args.epochs)
    pl.seed_everything(seed, verbose=False)
    teacher = MLP(hidden_dims=args.teacher_hidden, dropout=args.teacher_dropout)
    trainer(args.epochs).fit(Supervised(student=teacher, optimizer=opt, lr_scheduler=sched),
                             DistillDataModule("mnist1d", root=args.root, batch_size=100,
                                               batches_per_step=10))
    rows: dict[str, dict[str, float]] = {}
    for name in ("student alone", "student + KD"):
        pl.seed_everything(seed + 1000, verbose=False)  # the same student initialisation for both
        student = MLP(hidden_dims=args.student_hidden, dropout=args.student_dropout)
        common = dict(student=student, teacher=teacher, optimizer=opt, lr_scheduler=sched,
                      mc_dropout_samples=args.samples)
        model = (Supervised(**common) if name == "student alone" else
                 ResponseKD(temperature=args.temperature, ce_weight=0.1, kd_weight=0.9, **common))
        t = trainer(args.epochs)
        dm = data()
        t.fit(model, dm)
        train_phi = float(t.callback_metrics["train/distill_error"])  # test() clears callback_metrics
        torch.manual_seed(seed)
        metrics = t.test(model, dm, verbose=False)[0]
        rows[name] = {suffix: metrics[f"test/{suffix}"] for _, suffix, _, _ in COLUMNS
                      if f"test/{suffix}" in metrics}
        rows[name]["acc"] = metrics["test/acc"]
        rows[name]["train_distill_error"] = train_phi
        rows["teacher"] = {suffix: metrics[f"test/teacher_{suffix}"] for _, suffix, _, _ in COLUMNS
                           if f"test/teacher_{suffix}" in metrics}
        rows["teacher"]["acc"] = metrics["test/teacher_acc"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--samples", type=int, default=20, help="MC-dropout passes T")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--teacher-hidden", nargs="+", type=int, default=[512, 512])
    ap.add_argument("--teacher-dropout", type=float, default=0.5)
    ap.add_argument("--student-hidden", nargs="+", type=int, default=[100, 100])
    ap.add_argument("--student-dropout", type=float, default=0.2)
    ap.add_argument("--train-subset", type=int, default=None,
                    help="labelled examples of the students (default: the whole training split)")
    ap.add_argument("--root", default="data")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)

    start = time.perf_counter()
    per_seed = [run_seed(seed, args) for seed in args.seeds]
    elapsed = time.perf_counter() - start

    print(f"MNIST-1D, test set (1000). Teacher MLP 40-{'-'.join(map(str, args.teacher_hidden))}-10 "
          f"dropout {args.teacher_dropout}; students MLP 40-{'-'.join(map(str, args.student_hidden))}-10 "
          f"dropout {args.student_dropout}; {args.epochs} epochs each, Adam lr {args.lr} cosine; "
          f"ResponseKD T = {args.temperature}; MC dropout T = {args.samples} passes; "
          f"students trained on {args.train_subset or 'the whole training split'}; "
          f"seeds {args.seeds}. acc, ECE, distillation error, agreement in %; NLL, entropy in nats.\n")
    print("| network | " + " | ".join(h for h, *_ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for row in ROWS:
        cells = [mean_std([r[row][suffix] for r in per_seed if suffix in r[row]], scale, digits)
                 for _, suffix, scale, digits in COLUMNS]
        print(f"| {row} | " + " | ".join(cells) + " |")
    print(f"\n{len(args.seeds)} seeds in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
