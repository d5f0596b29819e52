"""Per-method cost: time per optimizer step relative to ResponseKD, and peak memory.

Every method is built from its shipped config the way ``kd-lightning fit`` builds it (the CLI's
parser, ``run=False``), with a random teacher (``teacher_checkpoint: null``), and trained by
``pl.Trainer`` for ``--warmup`` untimed and ``--steps`` timed optimizer steps; the time per
optimizer step is divided by that of ResponseKD built from the pair's ResponseKD config with the
method config's student, teacher, data set, batch size and ``batches_per_step`` (measured once per
setting). A two-stage method is timed in its first stage.

Pairs:

- ``mnist1d``: ``configs/mnist1d/<method>.yaml`` (for each method the shortest file name that
  names it, as the conformance tests do), MNIST-1D generated offline, the config's batch
  (100) and ``batches_per_step`` (10); deterministic inputs, so the teacher-output cache is on
  as in a real run (built at the start of training, outside the timed steps).
- ``cifar``: ``configs/cifar100/<method>_resnet56_resnet20.yaml`` (else ``configs/cifar10/``),
  resnet56 -> resnet20 on CIFAR-shaped random images in place of the CIFAR files (50,000 uint8
  training images, the config's augmentation), batch 64. A method with no such config is left
  out of this pair.

Each (pair, method) runs in a fresh subprocess. Peak memory: on a GPU,
``torch.cuda.max_memory_allocated`` during training; on a CPU the growth of the process's peak
resident set (``ru_maxrss``) from the built model to the end of training (what the steps
allocate on top of the model, data and teacher).

    python benchmarks/method_cost.py                       # both pairs, every method
    python benchmarks/method_cost.py --pair mnist1d --methods RelationKD CRD --steps 200
    python benchmarks/method_cost.py --out cost.md         # also write the table (.md or .csv)
    python benchmarks/method_cost.py --cpu-time            # process CPU time (a busy machine)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "ResponseKD"


# ---- configs ------------------------------------------------------------------------------------
def _class_name(path: Path) -> str:
    import yaml

    model = yaml.safe_load(path.read_text()).get("model") or {}
    return str(model.get("class_path", "")).rsplit(".", 1)[-1]


def configs(pair: str) -> dict[str, Path]:
    """Method class name -> the config it is measured with on ``pair``."""
    found: dict[str, Path] = {}
    if pair == "mnist1d":
        shortest_first = sorted((REPO / "configs" / "mnist1d").glob("*.yaml"),
                                key=lambda p: (len(p.stem), p.stem))
        for path in shortest_first:
            name = _class_name(path)
            if name:
                found.setdefault(name, path)
    else:
        for folder in ("cifar100", "cifar10"):
            for path in sorted((REPO / "configs" / folder).glob("*_resnet56_resnet20.yaml")):
                found.setdefault(_class_name(path), path)
        student = REPO / "configs" / "cifar100" / "student_resnet20.yaml"
        found.setdefault(_class_name(student), student)
    return found


# ---- one measurement (in a subprocess) ----------------------------------------------------------
def _random_cifar() -> None:
    """Serve CIFAR-shaped random images in place of the CIFAR-10/100 files: 50,000 training and
    1,000 test uint8 images of the set's number of classes, normalised and augmented by the
    data module as the real files are."""
    import functools

    import torch

    from kd_lightning.data import sources

    def load(name: str, root=None, download=False) -> sources.Splits:
        _, _, classes, mean, std = sources._TV[name]
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (51_000, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, classes, (51_000,), generator=g)
        return sources.Splits(name, x[:50_000], y[:50_000], x[50_000:], y[50_000:], classes,
                              mean=mean, std=std)

    for name in ("cifar10", "cifar100"):
        sources.SOURCES[name] = functools.partial(load, name)


def _setting(config: Path) -> dict:
    """What a method's cost is compared on: its student, teacher, batch size and grouping."""
    import yaml

    c = yaml.safe_load(config.read_text())
    init, data = (c.get("model") or {}).get("init_args") or {}, c.get("data") or {}
    return {"student": init.get("student"), "teacher": init.get("teacher"), "dataset": data.get("dataset"),
            "batch_size": data.get("batch_size"), "batches_per_step": data.get("batches_per_step")}


def measure(pair: str, name: str, steps: int, warmup: int, cpu_time: bool = False,
            like: str | None = None) -> dict:
    """Build ``name`` from its ``pair`` config as the CLI does and time its optimizer steps; with
    ``like``, ``name`` (ResponseKD) gets the student, teacher and batch of ``like``'s config."""
    import pytorch_lightning as pl
    import torch
    import yaml

    from kd_lightning.cli import cli_main
    from kd_lightning.training.term_log import TrainingDiverged

    config = configs(pair)[name]
    init = yaml.safe_load(config.read_text())["model"].get("init_args") or {}
    gpu = torch.cuda.is_available()
    clock_fn = time.process_time if cpu_time and not gpu else time.perf_counter
    args = ["--config", str(config), "--trainer.logger", "false"]
    if "teacher_checkpoint" in init:
        args += ["--model.init_args.teacher_checkpoint", "null"]
    if like is not None:
        for key, value in _setting(configs(pair)[like]).items():
            if value is not None:
                section = "model.init_args" if key in ("student", "teacher") else "data"
                args += [f"--{section}.{key}", value if isinstance(value, str) else json.dumps(value)]
    if pair == "cifar":
        _random_cifar()
    cli = cli_main(args, run=False)
    model, dm = cli.model, cli.datamodule

    class Clock(pl.Callback):
        """Times each Lightning batch (a group of ``batches_per_step`` minibatches, one optimizer
        step each) after the first ``warmup`` optimizer steps; stops after ``steps`` more."""

        def __init__(self) -> None:
            self.seen = self.timed = 0
            self.elapsed = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if gpu:
                torch.cuda.synchronize()
            self.start = clock_fn()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if gpu:
                torch.cuda.synchronize()
            elapsed = clock_fn() - self.start
            n = 1 if isinstance(batch[0], torch.Tensor) else len(batch)  # minibatches in the group
            if self.seen >= warmup:
                self.elapsed, self.timed = self.elapsed + elapsed, self.timed + n
            self.seen += n
            if self.timed >= steps:
                trainer.should_stop = True

    clock = Clock()
    trainer = pl.Trainer(max_epochs=10_000, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="gpu" if gpu else "cpu", devices=1,
                         callbacks=[clock])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    diverged = False
    try:
        trainer.fit(model, dm)
    except TrainingDiverged:  # checked at the epoch end, after the timed steps; noted in the table
        diverged = True
    if clock.timed < steps:
        raise RuntimeError(f"{name}: {clock.timed} timed steps, expected {steps}")
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if gpu else
               (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024)
    return {"pair": pair, "method": name, "config": str(config.relative_to(REPO)),
            "ms_per_step": 1e3 * clock.elapsed / clock.timed, "steps": clock.timed, "peak_mb": peak_mb,
            "device": torch.cuda.get_device_name() if gpu else "cpu", "diverged": diverged}


def run_one(pair: str, name: str, steps: int, warmup: int, cpu_time: bool,
            like: str | None = None) -> dict:
    """:func:`measure` in a fresh Python process (a clean peak-memory figure)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "--pair", pair, "--methods", name,
             "--steps", str(steps), "--warmup", str(warmup)] + (["--cpu-time"] if cpu_time else [])
            + (["--like", like] if like else []),
            cwd=tmp, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"pair": pair, "method": name, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the table ----------------------------------------------------------------------------------
def table(rows: list[dict], fmt: str) -> str:
    pairs = sorted({r["pair"] for r in rows}, key=["mnist1d", "cifar"].index)
    methods = sorted({r["method"] for r in rows})
    cell = {(r["pair"], r["method"]): r for r in rows}

    def fields(p: str, m: str) -> list[str]:
        r = cell.get((p, m))
        if r is None:
            return ["–", "–", "–", "–"]
        if "error" in r:
            return ["error", "", "", ""]
        base = r.get("baseline") or {}
        ratio = f"{r['ms_per_step'] / base['ms_per_step']:.2f}" if "ms_per_step" in base else "–"
        note = " (diverged)" if r.get("diverged") else ""
        return [f"{r['ms_per_step']:.2f}{note}", f"{base.get('ms_per_step', float('nan')):.2f}", ratio,
                f"{r['peak_mb']:.0f}"]

    head = ["method"] + [f"{p} {h}" for p in pairs
                         for h in ("ms/step", f"{BASELINE} ms/step", "ratio", "peak MB")]
    body = [[m] + [f for p in pairs for f in fields(p, m)] for m in methods]
    if fmt == "csv":
        return "\n".join(",".join(line) for line in [head, *body]) + "\n"
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=["mnist1d", "cifar", "both"], default="both")
    parser.add_argument("--methods", nargs="*", help="class names (default: every method with a config)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimizer steps (default 100 on mnist1d, 4 on cifar)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed optimizer steps first (default 20 on mnist1d, 1 on cifar)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="on a CPU, time steps in process CPU time instead of wall time (steadier "
                             "on a busy machine)")
    parser.add_argument("--out", type=Path, help="also write the table here (.csv or .md)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--like", help=argparse.SUPPRESS)
    args = parser.parse_args()
    pairs = ["mnist1d", "cifar"] if args.pair == "both" else [args.pair]
    if args.worker:
        pair, name = pairs[0], args.methods[0]
        steps = args.steps or (100 if pair == "mnist1d" else 4)
        warmup = args.warmup if args.warmup is not None else (20 if pair == "mnist1d" else 1)
        print(json.dumps(measure(pair, name, steps, warmup, args.cpu_time, args.like)))
        return
    rows = []
    for pair in pairs:
        available = configs(pair)
        steps = args.steps or (100 if pair == "mnist1d" else 4)
        warmup = args.warmup if args.warmup is not None else (20 if pair == "mnist1d" else 1)
        baselines: dict[str, dict] = {}  # setting -> ResponseKD measured on it
        for name in args.methods or sorted(available):
            if name not in available:
                print(f"{pair}: no config for {name}; left out", file=sys.stderr)
                continue
            row = run_one(pair, name, steps, warmup, args.cpu_time)
            key = json.dumps(_setting(available[name]), sort_keys=True)
            if key not in baselines:
                baselines[key] = run_one(pair, BASELINE, steps, warmup, args.cpu_time, like=name)
            row["baseline"] = baselines[key]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    text = table(rows, "csv" if args.out and args.out.suffix == ".csv" else "md")
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
