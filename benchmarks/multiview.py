"""The multi-view experiment on the ``multiview`` data set.

The claim of Allen-Zhu & Li ("Towards Understanding Ensemble, Knowledge Distillation and
Self-Distillation in Deep Learning", ICLR 2023), in the small instance of the course's lecture
notes on ensembles and distillation (the quotations are the notes'): on data whose labels each
have two features (v1, v2 for the first label, v3, v4 for the second; both present in 80% of the
examples, only one in 10% each), a single network
"quickly picks up one of the features" per label and "memorizes the remaining 10% of the training
examples without learning any new features": 100% training and 90% test accuracy. An ensemble,
knowledge distillation from the ensemble and self-distillation learn the missing features and
do better ("Knowledge Distillation forces the model to learn every feature of the label").

This script trains, through kd_lightning's methods and data module (in this process):

* ``--ensemble`` single networks (seeds 0, 1, ...) on the labels (``Supervised``);
* their ensemble (mean softmax);
* a student of the same architecture distilled from the ensemble (``ResponseKD``; the teacher's
  logits are the log of the ensemble's mean softmax);
* self-distillation: a student of the same architecture distilled from single network 0
  (``ResponseKD``, the born-again step);

and prints test accuracy overall and on each kind of test example: both features ("multi-view"),
only the label's first feature, only its second. A network that learned one feature per label
and memorised the rest fails on the single-view examples of the feature it did not learn.

Run (one thread)::

    OMP_NUM_THREADS=1 python benchmarks/multiview.py
    python benchmarks/multiview.py --model patch --noise 2 --n-train 500   # another setting
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from kd_lightning.data import DistillDataModule
from kd_lightning.data.sources import MULTIVIEW_DEFAULTS, make_multiview
from kd_lightning.methods import ResponseKD, Supervised
from kd_lightning.models import MLP


class PatchNet(nn.Module):
    r"""The two-layer patch network of multi-view analyses (Allen-Zhu & Li, "Towards Understanding
    Ensemble, Knowledge Distillation and Self-Distillation in Deep Learning", ICLR 2023):
    :math:`F_c(x) = \sum_{r \le m} \sum_p \widetilde{\mathrm{ReLU}}(\langle w_{c,r}, x_p\rangle)`,
    with the smoothed ReLU :math:`z^q / (q \rho^{q-1})` on :math:`[0, \rho]` and
    :math:`z - (1 - 1/q)\rho` above (here :math:`q = 3`, :math:`\rho = 0.1`)."""

    def __init__(self, patch_dim: int, num_classes: int = 2, width: int = 10, q: int = 3,
                 rho: float = 0.1, init_scale: float = 0.05) -> None:
        super().__init__()
        self.patch_dim, self.q, self.rho = patch_dim, q, rho
        self.w = nn.Parameter(init_scale / math.sqrt(patch_dim) * torch.randn(num_classes, width, patch_dim))

    def forward(self, x: Tensor) -> Tensor:
        patches = x.reshape(x.shape[0], -1, self.patch_dim)
        z = torch.einsum("bpd,kmd->bkmp", patches, self.w).clamp(min=0)
        act = torch.where(z <= self.rho, z ** self.q / (self.q * self.rho ** (self.q - 1)),
                          z - (1 - 1 / self.q) * self.rho)
        return act.sum((2, 3))


class MeanSoftmax(nn.Module):
    """An ensemble as a teacher: logits ``log(mean_i softmax(f_i(x)))`` (their softmax is the
    ensemble's mean prediction)."""

    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.stack([n(x).float().softmax(-1) for n in self.nets]).mean(0)
        return probs.clamp_min(1e-12).log()


def build(args, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    dim = args.patches * args.patch_dim
    if args.model == "mlp":
        return MLP(input_dim=dim, hidden_dims=[args.width], num_classes=2)
    return PatchNet(args.patch_dim, width=args.width)


def fit(module: pl.LightningModule, dm: DistillDataModule, args) -> pl.LightningModule:
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dm)
    return module


@torch.no_grad()
def accuracies(net: nn.Module, train_x: Tensor, train_y: Tensor, test) -> dict[str, float]:
    net.eval()
    acc = lambda logits, y: 100 * float((logits.argmax(-1) == y).float().mean())  # noqa: E731
    out = net(test.x)
    row = {"train": acc(net(train_x), train_y), "test": acc(out, test.y)}
    for view, name in enumerate(("multi-view", "first feature only", "second feature only")):
        mask = test.view == view
        row[name] = acc(out[mask], test.y[mask])
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["mlp", "patch"], default="mlp")
    p.add_argument("--width", type=int, default=100, help="MLP hidden units / PatchNet neurons per class")
    p.add_argument("--ensemble", type=int, default=5, help="single networks in the ensemble")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--n-train", type=int, default=MULTIVIEW_DEFAULTS["n_train"])
    p.add_argument("--n-test", type=int, default=MULTIVIEW_DEFAULTS["n_test"])
    p.add_argument("--patch-dim", type=int, default=MULTIVIEW_DEFAULTS["patch_dim"])
    p.add_argument("--patches", type=int, default=MULTIVIEW_DEFAULTS["patches"])
    p.add_argument("--noise", type=float, default=MULTIVIEW_DEFAULTS["noise"])
    p.add_argument("--data-seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()

    options = {"n_train": args.n_train, "n_test": args.n_test, "patch_dim": args.patch_dim,
               "patches": args.patches, "noise": args.noise, "seed": args.data_seed}
    dm = DistillDataModule("multiview", source_options=options, batch_size=args.batch_size,
                           val_split=0.0 if args.n_train < 20 else 0.1)
    dm.setup("fit")
    train_x, train_y, _ = dm.train_dataset.get_batch(torch.arange(len(dm.train_dataset)))
    test = make_multiview(args.n_test, args.patch_dim, args.patches, args.noise, args.data_seed, stream=2)
    assert torch.equal(test.y, dm.splits().y_test)  # the data set's own test split
    optimizer = lambda params: torch.optim.Adam(params, lr=args.lr)  # noqa: E731

    rows: dict[str, list[dict[str, float]]] = {}
    singles = []
    for seed in range(args.ensemble):
        net = build(args, seed)
        fit(Supervised(student=net, num_classes=2, optimizer=optimizer), dm, args)
        singles.append(net)
        rows.setdefault("single network", []).append(accuracies(net, train_x, train_y, test))
    ensemble = MeanSoftmax(singles)
    rows[f"ensemble of {args.ensemble} (mean softmax)"] = [accuracies(ensemble, train_x, train_y, test)]
    kd = build(args, 1000)
    fit(ResponseKD(student=kd, teacher=ensemble, num_classes=2, optimizer=optimizer,
                   temperature=args.temperature), dm, args)
    rows["KD from the ensemble"] = [accuracies(kd, train_x, train_y, test)]
    sd = build(args, 2000)
    fit(ResponseKD(student=sd, teacher=singles[0], num_classes=2, optimizer=optimizer,
                   temperature=args.temperature), dm, args)
    rows["self-distillation (from single network 0)"] = [accuracies(sd, train_x, train_y, test)]

    cols = ["train", "test", "multi-view", "first feature only", "second feature only"]
    n_views = [int((test.view == v).sum()) for v in range(3)]
    print(f"\nmultiview: n_train {len(train_y)} (+{len(dm.val_dataset)} validation), n_test "
          f"{args.n_test} ({n_views[0]} multi-view, {n_views[1]} / {n_views[2]} with only the "
          f"first / second feature), patch_dim {args.patch_dim}, patches {args.patches}, noise "
          f"{args.noise}; model {args.model} width {args.width}, Adam lr {args.lr}, batch "
          f"{args.batch_size}, {args.epochs} epochs, KD T = {args.temperature}, ce 0.1 / kd 0.9\n")
    print("| model | " + " | ".join(f"{c} acc. (%)" for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, rs in rows.items():
        cells = []
        for c in cols:
            values = [r[c] for r in rs]
            cells.append(f"{values[0]:.2f}" if len(values) == 1 else
                         f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
