"""What does kd_lightning cost over a hand-written PyTorch loop?

Times, in one process and alternating several times:
  (a) a plain PyTorch loop: same models, same data order (the same DataLoader), same optimizer,
      same Hinton KD math, teacher logits precomputed once;
  (b) the same training through kd_lightning (``ResponseKD`` + ``DistillDataModule`` +
      ``pl.Trainer``), as a user gets it by default (teacher cache on, per-epoch logging to
      TensorBoard, the optimizer exactly as configured, and ``data.batches_per_step`` as the
      shipped ``configs/mnist1d/response.yaml`` sets it), without validation.

Setting 1: MNIST-1D, MLP student, CNN teacher (width 64), batch 100, 8000 optimizer steps.
Setting 2: CIFAR resnet56 -> resnet20 on synthetic 32x32 input with augmentation (so the teacher
forward cannot be cached; the ratio shows the framework's own overhead), a few hundred steps.

Prints one JSON line. Run: ``python benchmarks/overhead.py`` (``--quick`` for a short check).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from kd_lightning.data import DistillDataModule
from kd_lightning.data.dataset import IndexedTensorDataset
from kd_lightning.losses import response_kd_loss
from kd_lightning.methods import ResponseKD, Supervised
from kd_lightning.models import MLP, ConvNet1D, resnet20, resnet56

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning_fabric").setLevel(logging.ERROR)

T, CE_WEIGHT, KD_WEIGHT, LR = 4.0, 0.1, 0.9, 1e-2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOCK = time.perf_counter  # --cpu-time switches to process CPU time (robust on a busy machine)


def shipped_batches_per_step() -> int:
    """``data.batches_per_step`` of the shipped MNIST-1D ResponseKD config."""
    import yaml

    with open(os.path.join(REPO, "configs", "mnist1d", "response.yaml")) as f:
        data = yaml.safe_load(f)["data"]
    return int(data.get("init_args", data).get("batches_per_step", 1))


def make_teacher(steps: int = 1500) -> ConvNet1D:
    """A CNN teacher trained briefly with kd_lightning (not timed)."""
    pl.seed_everything(123, verbose=False)
    teacher = ConvNet1D(width=64)
    model = Supervised(student=teacher, optimizer=lambda p: torch.optim.Adam(p, lr=LR))
    pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
               devices=1).fit(model, DistillDataModule("mnist1d"))
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(net: torch.nn.Module, dm: DistillDataModule) -> float:
    net.eval()
    dm.setup("test")
    ds = dm.test_dataset
    x, y, _ = ds.get_batch(torch.arange(len(ds)))
    return (net(x).argmax(-1) == y).float().mean().item() * 100


def plain_loop(teacher, dm: DistillDataModule, steps: int, seed: int, student_fn) -> tuple[float, torch.nn.Module]:
    """(a) hand-written loop with teacher logits precomputed."""
    pl.seed_everything(seed, verbose=False)
    student = student_fn()
    start = CLOCK()
    ds = dm.train_dataset
    with torch.no_grad():  # teacher logits once per example
        x_all, _, idx_all = ds.get_batch(torch.arange(len(ds)))
        cache = torch.zeros(int(idx_all.max()) + 1, 10)
        cache[idx_all] = teacher(x_all)
    opt = torch.optim.Adam(student.parameters(), lr=LR)
    loader = dm.train_dataloader()
    step = 0
    student.train()
    while step < steps:
        for x, y, idx in loader:
            logits = student(x)
            loss, _, _ = response_kd_loss(logits, cache[idx], y, T, CE_WEIGHT, KD_WEIGHT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return CLOCK() - start, student


def lightning_run(teacher, dm: DistillDataModule, steps: int, seed: int, student_fn,
                  log_dir: str) -> tuple[float, torch.nn.Module]:
    """(b) the same through kd_lightning, as a user gets it by default."""
    pl.seed_everything(seed, verbose=False)
    student = student_fn()
    start = CLOCK()
    model = ResponseKD(student=student, teacher=teacher, temperature=T, ce_weight=CE_WEIGHT, kd_weight=KD_WEIGHT,
                       optimizer=lambda p: torch.optim.Adam(p, lr=LR))
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, accelerator="cpu", devices=1,
                         logger=TensorBoardLogger(log_dir, name="bench"),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, dm)
    return CLOCK() - start, student


def mnist1d_setting(steps: int, repeats: int, batches_per_step: int) -> dict:
    teacher = make_teacher()
    dm = DistillDataModule("mnist1d", batch_size=100)
    dm.setup("fit")
    # the same examples in the same order, k minibatches per Lightning step
    dm_kd = DistillDataModule("mnist1d", batch_size=100, batches_per_step=batches_per_step)
    dm_kd.setup("fit")
    times = {"plain": [], "kd_lightning": []}
    accs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name in (("plain", "kd_lightning") if r % 2 == 0 else ("kd_lightning", "plain")):
                if name == "plain":
                    t, student = plain_loop(teacher, dm, steps, seed=r, student_fn=MLP)
                else:
                    t, student = lightning_run(teacher, dm_kd, steps, seed=r, student_fn=MLP, log_dir=tmp)
                times[name].append(t)
                accs.setdefault(name, []).append(accuracy(student, DistillDataModule("mnist1d")))
    a, b = statistics.median(times["plain"]), statistics.median(times["kd_lightning"])
    return {"steps": steps, "batches_per_step": batches_per_step,
            "plain_s": round(a, 3), "kd_lightning_s": round(b, 3),
            "ratio": round(b / a, 3),
            "plain_ms_per_step": round(1000 * a / steps, 4),
            "kd_lightning_ms_per_step": round(1000 * b / steps, 4),
            "plain_test_acc": round(statistics.mean(accs["plain"]), 2),
            "kd_lightning_test_acc": round(statistics.mean(accs["kd_lightning"]), 2),
            "test_acc_per_seed": {k: [round(v, 2) for v in accs[k]] for k in accs},
            "teacher_test_acc": round(accuracy(teacher, DistillDataModule("mnist1d")), 2),
            "times_plain": [round(t, 3) for t in times["plain"]],
            "times_kd_lightning": [round(t, 3) for t in times["kd_lightning"]]}


class _SyntheticCifar(DistillDataModule):
    """CIFAR-shaped random uint8 images, augmented (pad-4 crop + flip) like real CIFAR runs."""

    def __init__(self, n: int, batch_size: int) -> None:
        super().__init__("cifar10", batch_size=batch_size, augment=True, download=True)
        g = torch.Generator().manual_seed(0)
        self._x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        self._y = torch.randint(0, 10, (n,), generator=g)

    def prepare_data(self) -> None:
        pass

    def setup(self, stage=None) -> None:
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        self.train_indices = torch.arange(len(self._y)).numpy()
        self.train_dataset = IndexedTensorDataset(self._x, self._y, None, mean, std, augment=True)


def cifar_plain(teacher, dm, steps, seed):
    pl.seed_everything(seed, verbose=False)
    student = resnet20(num_classes=10)
    start = CLOCK()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    step = 0
    student.train()
    while step < steps:
        for x, y, _ in dm.train_dataloader():
            with torch.no_grad():
                t_logits = teacher(x)
            loss, _, _ = response_kd_loss(student(x), t_logits, y, T, CE_WEIGHT, KD_WEIGHT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return CLOCK() - start


def cifar_lightning(teacher, dm, steps, seed, log_dir):
    pl.seed_everything(seed, verbose=False)
    student = resnet20(num_classes=10)
    start = CLOCK()
    model = ResponseKD(student=student, teacher=teacher, temperature=T, ce_weight=CE_WEIGHT, kd_weight=KD_WEIGHT,
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4))
    pl.Trainer(max_steps=steps, limit_val_batches=0, accelerator="cpu", devices=1,
               logger=TensorBoardLogger(log_dir, name="bench_cifar"), enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(model, dm)
    return CLOCK() - start


def cifar_setting(steps: int, repeats: int, batch_size: int = 64) -> dict:
    teacher = resnet56(num_classes=10).eval().requires_grad_(False)
    dm = _SyntheticCifar(n=batch_size * 50, batch_size=batch_size)
    dm.setup("fit")
    times = {"plain": [], "kd_lightning": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            order = ("plain", "kd_lightning") if r % 2 == 0 else ("kd_lightning", "plain")
            for name in order:
                t = (cifar_plain(teacher, dm, steps, r) if name == "plain"
                     else cifar_lightning(teacher, dm, steps, r, tmp))
                times[name].append(t)
    a, b = statistics.median(times["plain"]), statistics.median(times["kd_lightning"])
    return {"steps": steps, "batch_size": batch_size, "plain_s": round(a, 3),
            "kd_lightning_s": round(b, 3), "ratio": round(b / a, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cifar-steps", type=int, default=200)
    parser.add_argument("--cifar-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1000 MNIST-1D steps, 30 CIFAR steps")
    parser.add_argument("--batches-per-step", type=int, default=None,
                        help="data.batches_per_step for (b) (default: the shipped MNIST-1D config's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall time (busy machines)")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    if args.quick:
        args.steps, args.cifar_steps, args.repeats, args.cifar_repeats = 1000, 30, 2, 1
    out = {"clock": "process_cpu_time" if args.cpu_time else "wall", "torch": torch.__version__, "pytorch_lightning": pl.__version__,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "mnist1d_mlp_from_cnn": mnist1d_setting(args.steps, args.repeats,
                                                   args.batches_per_step or shipped_batches_per_step())}
    if args.cifar_steps > 0:
        out["cifar_resnet56_to_resnet20"] = cifar_setting(args.cifar_steps, args.cifar_repeats)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
