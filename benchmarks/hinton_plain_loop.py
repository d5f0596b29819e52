"""Hinton et al. 2015's MNIST distillation in a plain PyTorch loop (no Lightning), as a reference.

Trains the 784-800-800-10 ReLU MLP student (PyTorch's default ``nn.Linear`` initialisation) on
the soft targets of a trained teacher at temperature ``T``,

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))  (summed over classes, batch mean)
           + (1 - alpha) * CE(y, z_s),

written here with ``F.kl_div(..., reduction="batchmean")``, independently of
``kd_lightning.losses``. SGD with Nesterov momentum 0.9, ``OneCycleLR`` stepped after every batch,
teacher logits computed once in eval mode. The same recipe as ``configs/mnist/response.yaml``
(``--alpha 0`` and no teacher: ``configs/mnist/student.yaml``), so the two can be compared; the
options switch on the differences a Lightning run may have:

* ``--normalize standard|unit``: pixel scaling (the teacher sees the same inputs as the student,
  as in ``DistillDataModule``); ``--teacher-normalize`` feeds the teacher another scaling;
* ``--val-split N``: hold N training images out (seeded as ``DistillDataModule``'s split);
* ``--sched-interval epoch``: step the schedule once per epoch instead of once per batch
  (``constant``: no schedule, for finding the largest stable lr).

Prints the training loss and the test errors (``round((1 - acc) * 10000)``) every epoch, flags a
non-finite loss and exits with status 1 when one occurs. Run from the repo root::

    OMP_NUM_THREADS=1 python benchmarks/hinton_plain_loop.py --root /work/data \\
        --teacher runs/mnist_teacher/checkpoints/best.ckpt --normalize unit
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_lightning.data import load_source, train_val_split  # noqa: E402
from kd_lightning.models import MnistCNN  # noqa: E402
from kd_lightning.models.weights import load_teacher_weights  # noqa: E402

MEAN, STD = 0.1307, 0.3081


def scale(x_uint8: torch.Tensor, normalize: str) -> torch.Tensor:
    x = x_uint8.float() / 255.0
    return (x - MEAN) / STD if normalize == "standard" else x


def student_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 800), nn.ReLU(), nn.Linear(800, 800),
                         nn.ReLU(), nn.Linear(800, 10))


@torch.no_grad()
def errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    model.eval()
    pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return int((pred != y).sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data")
    p.add_argument("--teacher",
                   help="teacher checkpoint (configs/mnist/teacher.yaml); omit for the student alone")
    p.add_argument("--normalize", choices=["standard", "unit"], default="unit")
    p.add_argument("--teacher-normalize", choices=["standard", "unit"], default=None,
                   help="scaling of the teacher's inputs (default: --normalize)")
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--alpha", type=float, default=1.0, help="soft-target weight (CE gets 1 - alpha)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak lr of the one-cycle schedule")
    p.add_argument("--sched-interval", choices=["step", "epoch", "constant"], default="step",
                   help="step the one-cycle schedule per batch or per epoch, or keep lr constant")
    p.add_argument("--val-split", type=int, default=0, help="training images held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    s = load_source("mnist", args.root)
    train_pos, _ = train_val_split(len(s.y_train), args.val_split, 0)
    x_tr_u8, y_tr = s.x_train[train_pos], s.y_train[train_pos]
    x_tr, x_te = scale(x_tr_u8, args.normalize), scale(s.x_test, args.normalize)
    n = len(y_tr)

    t_logits = None
    if args.teacher:
        teacher = MnistCNN()
        load_teacher_weights(teacher, args.teacher)
        teacher.eval()
        t_norm = args.teacher_normalize or args.normalize
        with torch.no_grad():
            x_t = scale(x_tr_u8, t_norm)
            t_logits = torch.cat([teacher(x_t[i:i + 1000]) for i in range(0, n, 1000)])
        print(f"teacher: {errors(teacher, scale(s.x_test, t_norm), s.y_test)} test errors on "
              f"{t_norm} inputs; train logits |z| max {t_logits.abs().max():.1f}", flush=True)
    elif args.alpha > 0:
        p.error("--alpha > 0 needs --teacher")

    student = student_mlp()
    opt = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(n / args.batch_size)
    if args.sched_interval == "constant":
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    else:
        total = args.epochs * (steps_per_epoch if args.sched_interval == "step" else 1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total)
    T = args.temperature
    step, start = 0, time.time()
    for epoch in range(args.epochs):
        student.train()
        perm = torch.randperm(n)
        total_loss, seen = 0.0, 0
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            z = student(x_tr[idx])
            loss = torch.zeros(())
            if args.alpha > 0:
                kd = F.kl_div(F.log_softmax(z / T, 1), F.softmax(t_logits[idx] / T, 1),
                              reduction="batchmean") * T * T
                loss = loss + args.alpha * kd
            if args.alpha < 1:
                loss = loss + (1 - args.alpha) * F.cross_entropy(z, y_tr[idx])
            if not torch.isfinite(loss):
                print(f"non-finite loss {loss.item()} at epoch {epoch} step {step} "
                      f"(lr {sched.get_last_lr()[0]:.4f})", flush=True)
                return 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if args.sched_interval == "step":
                sched.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
            step += 1
            if args.max_steps and step >= args.max_steps:
                break
        if args.sched_interval == "epoch":
            sched.step()
        print(f"epoch {epoch + 1:3d}  loss {total_loss / seen:.4f}  lr {sched.get_last_lr()[0]:.4f}  "
              f"test errors {errors(student, x_te, s.y_test)}  ({time.time() - start:.0f} s)", flush=True)
        if args.max_steps and step >= args.max_steps:
            break
    print(f"final test errors {errors(student, x_te, s.y_test)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
