"""The CIFAR-100 distillation table of the CRD benchmark, measured with kd_lightning.

For each teacher -> student pair (resnet56 -> resnet20, resnet32x4 -> resnet8x4,
wrn_40_2 -> wrn_16_2) this trains the teacher with ``configs/cifar100/teacher_<t>.yaml`` (or loads
it: ``--teacher-ckpt <t>=PATH``, or the checkpoint of an earlier run of this script), trains the
student alone with ``student_<s>.yaml`` and distils with every method config
``<key>_<t>_<s>.yaml`` (the 240-epoch recipe of the CRD benchmark is in those configs). Every run
is ``kd-lightning fit --config <config>`` through :func:`kd_lightning.jobs.run_job` (in-process on
one device; a subprocess under DDP), whose
test accuracy is that of the best checkpoint by validation accuracy. The markdown table (rows:
methods, columns: pairs) prints the measured figure beside the published one
(``benchmarks/cifar100_published.yaml``, with its source per row); a method whose config does not
exist yet gets a row saying so.

Each finished run is appended to ``<out>/results.jsonl`` at once; running the same command again
skips finished runs and resumes an interrupted one from its ``last.ckpt``. A run is identified by a
hash of its config file, the overrides this script adds and (for students) the teacher, so
changing ``--epochs`` or a config trains afresh.

On a GPU machine with the CIFAR-100 python files under ``data/cifar-100-python``::

    python benchmarks/cifar100_table.py --data-root data --out runs/cifar100_table
    python benchmarks/cifar100_table.py --devices 4 --out runs/cifar100_table   # DDP, 4 GPUs per run

CPU smoke run on fake CIFAR-100-shaped files (accuracies meaningless)::

    python benchmarks/cifar100_table.py --synthetic --max-steps 2 --out /tmp/cifar_smoke

Arguments after ``--`` are appended to every ``kd-lightning fit`` command
(e.g. ``-- --trainer.precision bf16-mixed``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from kd_lightning import KDConfigError, jobs  # noqa: E402

CONFIG_DIR = REPO / "configs" / "cifar100"
PUBLISHED = Path(__file__).with_name("cifar100_published.yaml")
RECIPE_EPOCHS = 240  # the CRD recipe's training length, which --epochs replaces
RECIPE_BATCH = 64  # the recipe's batch size; under DDP it is split over the devices
#: teacher -> student pairs of the table, in column order
PAIRS = {
    "resnet56_resnet20": ("resnet56", "resnet20"),
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
    "wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
}
#: row order of the table (RepDistiller's, then the later methods); configs with other keys that
#: exist for a pair are appended after these
METHOD_ORDER = ["response", "fitnet", "at", "sp", "cc", "vid", "relation", "pkt", "ab", "ft", "fsp",
                "nst", "crd", "ofd", "reviewkd", "dkd", "dist", "lskd"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# ------------------------------------------------------------------------------------------
# what to run


def config_path(config_dir: Path, key: str, pair: str) -> Path:
    """The config of row ``key`` for ``pair``: teacher_<t>.yaml, student_<s>.yaml or <key>_<pair>.yaml."""
    teacher, student = PAIRS[pair]
    name = {"teacher": f"teacher_{teacher}", "student": f"student_{student}"}.get(key, f"{key}_{pair}")
    return config_dir / f"{name}.yaml"


def discover_methods(config_dir: Path, pairs: list[str]) -> list[str]:
    """Method keys in table order: the known ones, then any other ``<key>_<pair>.yaml`` found."""
    extra = set()
    for pair in pairs:
        for path in config_dir.glob(f"*_{pair}.yaml"):
            key = path.name[: -len(f"_{pair}.yaml")]
            if key not in METHOD_ORDER and key not in ("teacher", "student"):
                extra.add(key)
    return METHOD_ORDER + sorted(extra)


def load_published(path: Path = PUBLISHED) -> dict:
    data = yaml.safe_load(path.read_text())
    for key, row in data["rows"].items():
        if row["source"] not in data["sources"]:
            raise KDConfigError(f"{path}: row '{key}' cites unknown source '{row['source']}'.")
        unknown = set(row.get("published") or {}) - set(PAIRS)
        if unknown:
            raise KDConfigError(f"{path}: row '{key}' has figures for unknown pairs {sorted(unknown)}; "
                                f"pairs are {', '.join(PAIRS)}.")
    return data


def _sha(text: str | bytes, n: int = 12) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:n]


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def epoch_overrides(cfg: dict, epochs: int | None) -> list[str]:
    """CLI overrides that shorten a config's recipe from 240 to ``epochs`` epochs.

    Everything counted in epochs scales by ``epochs / 240``: ``trainer.max_epochs`` (so the 270
    epochs of AB/FSP, 30 of transfer + 240, become ``270 * epochs / 240``), MultiStepLR
    ``milestones``, ``T_max`` / ``step_size`` of the scheduler, and integer ``*_epochs``
    hyperparameters of the method (fractions of ``max_epochs`` scale by themselves).
    """
    if epochs is None:
        return []
    if epochs < 1:
        raise KDConfigError(f"--epochs must be >= 1, got {epochs}.")
    scale = epochs / RECIPE_EPOCHS

    def scaled(v: int) -> int:
        return max(1, round(v * scale))

    max_epochs = (cfg.get("trainer") or {}).get("max_epochs", RECIPE_EPOCHS)
    out = ["--trainer.max_epochs", str(scaled(max_epochs))]
    init = ((cfg.get("model") or {}).get("init_args") or {})
    for key, value in init.items():
        if key.endswith("epochs") and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out += [f"--model.init_args.{key}", str(scaled(value))]
    sched = ((init.get("lr_scheduler") or {}).get("init_args") or {})
    if "milestones" in sched:
        out += ["--model.init_args.lr_scheduler.init_args.milestones",
                json.dumps([scaled(m) for m in sched["milestones"]])]
    for key in ("T_max", "step_size"):
        if isinstance(sched.get(key), int):
            out += [f"--model.init_args.lr_scheduler.init_args.{key}", str(scaled(sched[key]))]
    return out


def ddp_overrides(cfg: dict, devices: int, strategy: str | None, sync_bn: bool = True) -> list[str]:
    """Trainer flags for ``devices`` processes keeping the recipe's global batch of 64.

    Each device gets 64 / N examples and (``sync_bn``, GPUs only) BatchNorm statistics are
    synchronised over the devices, so N devices train the same batches as one. Two-stage methods
    (``stage1_epochs`` > 0) leave the student's head without gradient in stage 1, which plain
    ``ddp`` rejects; they get ``ddp_find_unused_parameters_true`` unless ``strategy`` says otherwise.
    """
    if devices < 1:
        raise KDConfigError(f"--devices must be >= 1, got {devices}.")
    if devices == 1:
        return ["--trainer.devices", "1"]
    batch = ((cfg.get("data") or {}).get("batch_size") or RECIPE_BATCH)
    if batch % devices:
        raise KDConfigError(f"the recipe's batch of {batch} cannot be split over {devices} devices; "
                            f"use a --devices that divides {batch} (1, 2, 4, 8, ...).")
    init = ((cfg.get("model") or {}).get("init_args") or {})
    two_stage = bool(init.get("stage1_epochs"))
    strategy = strategy or ("ddp_find_unused_parameters_true" if two_stage else "ddp")
    return ["--trainer.devices", str(devices), "--trainer.strategy", strategy,
            "--trainer.sync_batchnorm", str(sync_bn).lower(), "--data.batch_size", str(batch // devices)]


def callbacks_arg(run_dir: Path) -> list[str]:
    """best.ckpt by validation accuracy (tested after fit) and last.ckpt (for resuming) in the run dir."""
    ckpt_dir = str(run_dir / "checkpoints")
    callbacks = [
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": ckpt_dir, "filename": "best", "monitor": "val/acc", "mode": "max",
                       "enable_version_counter": False}},
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": ckpt_dir, "filename": "last", "monitor": None, "save_top_k": 1,
                       "enable_version_counter": False}},
        {"class_path": "pytorch_lightning.callbacks.LearningRateMonitor",
         "init_args": {"logging_interval": "epoch"}},
    ]
    return ["--trainer.callbacks", json.dumps(callbacks)]


@dataclass
class Run:
    """One cell of the table: a ``kd-lightning fit`` of ``config`` for row ``key`` of ``pair``."""

    pair: str
    key: str
    config: Path
    overrides: list[str]  # everything that defines the run besides the config file
    data: str = "cifar100"  # or "synthetic": part of the run's identity
    teacher: Run | None = None
    teacher_ckpt: Path | None = None  # a given (not trained here) teacher
    status: str = "todo"  # todo | done | failed | skipped
    note: str = ""
    result: dict = field(default_factory=dict)

    @property
    def run_hash(self) -> str:
        teacher = (self.teacher.run_hash if self.teacher is not None else
                   _file_sha(self.teacher_ckpt) if self.teacher_ckpt is not None else None)
        return _sha(json.dumps({"config": _file_sha(self.config), "overrides": self.overrides,
                                "data": self.data, "teacher": teacher}))

    def run_dir(self, out: Path) -> Path:
        name = f"teacher_{PAIRS[self.pair][0]}" if self.key == "teacher" else f"{self.pair}/{self.key}"
        return out / "runs" / f"{name}-{self.run_hash}"

    def checkpoint(self, out: Path) -> Path:
        """The teacher weights this run leaves: best.ckpt, or last.ckpt if no validation ran."""
        ckpts = self.run_dir(out) / "checkpoints"
        return ckpts / "best.ckpt" if (ckpts / "best.ckpt").is_file() else ckpts / "last.ckpt"

    def args(self, out: Path, data_root: Path) -> list[str]:
        run_dir = self.run_dir(out)
        args = ["fit", "--config", str(self.config), "--data.root", str(data_root),
                "--trainer.logger.init_args.save_dir", str(run_dir),
                "--trainer.logger.init_args.name", "", "--trainer.logger.init_args.version", "tb",
                *callbacks_arg(run_dir), *QUIET, *self.overrides]
        teacher_ckpt = self.teacher.checkpoint(out) if self.teacher is not None else self.teacher_ckpt
        if teacher_ckpt is not None:
            args += ["--model.init_args.teacher_checkpoint", str(teacher_ckpt)]
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            args += ["--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
        return args


def plan(pairs: list[str], methods: list[str], config_dir: Path, common: list[str],
         epochs: int | None, devices: int, strategy: str | None, teacher_ckpts: dict[str, Path],
         data: str = "cifar100", sync_bn: bool = True) -> dict[str, dict[str, Run | str]]:
    """``{pair: {row key: Run or the reason it cannot run}}`` for the teacher and ``methods``
    (``student`` is the student-alone baseline)."""
    table: dict[str, dict[str, Run | str]] = {}
    for pair in pairs:
        t_name = PAIRS[pair][0]
        row: dict[str, Run | str] = {}

        def make(key: str) -> Run | str:
            path = config_path(config_dir, key, pair)
            if not path.is_file():
                return f"no config ({_show(path)})"
            cfg = yaml.safe_load(path.read_text()) or {}
            return Run(pair, key, path, [*epoch_overrides(cfg, epochs),
                                         *ddp_overrides(cfg, devices, strategy, sync_bn), *common], data)

        if t_name in teacher_ckpts:
            teacher: Run | str | None = None
            row["teacher"] = f"given: {teacher_ckpts[t_name]}"
        else:
            teacher = make("teacher")
            row["teacher"] = teacher
        for key in methods:
            run = make(key)
            if isinstance(run, Run) and _has_teacher(run.config):
                if t_name in teacher_ckpts:
                    run.teacher_ckpt = teacher_ckpts[t_name]
                elif isinstance(teacher, Run):
                    run.teacher = teacher
                else:
                    run = f"no teacher ({teacher})"
            row[key] = run
        table[pair] = row
    return table


def _show(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _has_teacher(config: Path) -> bool:
    init = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("init_args") or {}
    return bool(init.get("teacher"))


# ------------------------------------------------------------------------------------------
# running


class Results:
    """``results.jsonl``: one line per finished run, appended (and fsynced) as it finishes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def done(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return {r["run_hash"]: r for r in records}

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def execute(run: Run, out: Path, data_root: Path, results: Results, isolate: bool, info: dict) -> None:
    """Train ``run`` unless ``results`` already has it; sets its status and result."""
    done = results.done()
    if run.run_hash in done:
        run.status, run.result = "done", done[run.run_hash]
        print(f"[done]    {run.pair:22s} {run.key:10s} {run.result['test_acc']:.2f}  (finished earlier)")
        return
    if run.teacher is not None and run.teacher.status != "done":
        run.status, run.note = "skipped", f"teacher run {run.teacher.status}"
        print(f"[skipped] {run.pair:22s} {run.key:10s} teacher {run.teacher.status}")
        return
    run_dir = run.run_dir(out)
    args = run.args(out, data_root)
    print(f"[run]     {run.pair:22s} {run.key:10s} kd-lightning {shlex.join(args[:3])} ...  log: "
          f"{run_dir / 'run.log'}", flush=True)
    start = time.perf_counter()
    try:
        metrics = jobs.run_job(jobs.Job(args, run_dir / "run.log", isolate)).metrics
    except jobs.JobFailed as err:  # one failing method must not stop the table
        run.status, run.note = "failed", f"{err} (log: {run_dir / 'run.log'})"
        print(f"[failed]  {run.pair:22s} {run.key:10s} {run.note}", file=sys.stderr, flush=True)
        return
    if "test/acc" not in metrics:
        run.status, run.note = "failed", f"no test/acc was logged (log: {run_dir / 'run.log'})"
        print(f"[failed]  {run.pair:22s} {run.key:10s} {run.note}", file=sys.stderr, flush=True)
        return
    record = {"pair": run.pair, "method": run.key, "run_hash": run.run_hash,
              "test_acc": round(100 * metrics["test/acc"], 2),
              "teacher_acc": (round(100 * metrics["test/teacher_acc"], 2)
                              if "test/teacher_acc" in metrics else None),
              "config": _show(run.config),
              "overrides": run.overrides, "wall_time_s": round(time.perf_counter() - start, 1),
              "run_dir": str(run_dir), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
    results.append(record)
    run.status, run.result = "done", record
    print(f"[done]    {run.pair:22s} {run.key:10s} {record['test_acc']:.2f}  "
          f"({record['wall_time_s']} s)", flush=True)


# ------------------------------------------------------------------------------------------
# synthetic data


def write_synthetic_cifar100(root: Path, n_train: int = 500, n_test: int = 100, seed: int = 0) -> Path:
    """Random CIFAR-100 files in torchvision's on-disk format under ``root/cifar-100-python``.

    Pickled dicts as in the real archive: ``data`` uint8 ``[N, 3072]`` (channel-major rows),
    ``fine_labels`` / ``coarse_labels`` lists; ``meta`` holds ``fine_label_names``. Labels cycle
    through the 100 classes.
    """
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = [i % 100 for i in range(n)]
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [y // 5 for y in labels],
                         "filenames": [f"{name}_{i}.png" for i in range(n)]}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"superclass{i}" for i in range(20)]}, f)
    return root


# ------------------------------------------------------------------------------------------
# the table


def _label(pair: str) -> str:
    t, s = PAIRS[pair]
    return f"{t} → {s}"


def format_table(table: dict[str, dict[str, Run | str]], rows: list[str], published: dict,
                 header: str) -> str:
    """Markdown: one row per method, per pair a measured and a published column, then the source."""
    pairs = list(table)
    cols = ["method", *[c for p in pairs for c in (f"{_label(p)} measured", "published")],
            "published figures from"]
    lines = [header, "", "| " + " | ".join(cols) + " |",
             "|" + "|".join(["---"] + ["---:"] * (2 * len(pairs)) + ["---"]) + "|"]
    notes: list[str] = []
    missing: dict[str, list[str]] = {}  # row -> its config files that do not exist
    cited: list[str] = []
    for key in rows:
        pub_row = published["rows"].get(key, {})
        label = pub_row.get("label", key)
        cells = [f"{label} (`{key}`)" if key not in ("teacher", "student") else label]
        for pair in pairs:
            cells.append(_measured_cell(table[pair].get(key), key, pair, table[pair], notes, missing))
            figure = (pub_row.get("published") or {}).get(pair)
            cells.append(f"{figure:.2f}" if figure is not None else "")
        if pub_row:
            cited.append(pub_row["source"])
            cite = f"[{published['sources'][pub_row['source']]['short']}][{pub_row['source']}]"
            if pub_row.get("missing"):
                cite += f"; blank: {pub_row['missing']}"
        else:
            cite = "none found (no published figure for this benchmark)"
        cells.append(cite)
        lines.append("| " + " | ".join(cells) + " |")
    notes += [f"`{key}` not run, no config: " + ", ".join(f"`{p}`" for p in paths)
              for key, paths in missing.items()]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    if cited:
        sources = published["sources"]
        lines += ["", "Sources of the published figures:", ""]
        lines += [f"- {sources[k]['cite']}: <{sources[k]['url']}>" for k in dict.fromkeys(cited)]
        lines += [""] + [f"[{k}]: {sources[k]['url']}" for k in dict.fromkeys(cited)]
    return "\n".join(lines) + "\n"


def _measured_cell(entry: Run | str | None, key: str, pair: str, pair_runs: dict, notes: list[str],
                   missing: dict[str, list[str]]) -> str:
    """The measured cell of row ``key``; why a figure is missing goes to ``notes`` / ``missing``."""
    if entry is None:
        return "not selected"
    if isinstance(entry, str):  # cannot run: no config, no teacher, or a given teacher
        if entry.startswith("given"):
            accs = [r.result.get("teacher_acc") for r in pair_runs.values()
                    if isinstance(r, Run) and r.status == "done" and r.result.get("teacher_acc") is not None]
            if accs:
                return f"{accs[0]:.2f}"
            notes.append(f"teacher of {pair} {entry}: measured by the first distillation run of its pair")
            return "given"
        if entry.startswith("no config ("):
            missing.setdefault(key, []).append(entry[len("no config ("):-1])
        else:
            notes.append(f"`{key}` ({pair}): {entry}; skipped")
        return "skipped: " + entry.split(" (")[0]
    if entry.status == "done":
        return f"{entry.result['test_acc']:.2f}"
    if entry.status == "failed":
        notes.append(f"`{key}` ({pair}) failed: {entry.note}")
        return "failed"
    if entry.status == "skipped":
        return f"skipped: {entry.note}"
    return "not run yet"


def make_header(args: argparse.Namespace, n_done: int) -> str:
    lines = ["# CIFAR-100: kd_lightning against the published CRD-benchmark figures", ""]
    if args.synthetic:
        lines += ["**Synthetic data** (random CIFAR-100-shaped files): a plumbing check; the measured "
                  "numbers mean nothing.", ""]
    elif n_done == 0:
        lines += ["**Not measured yet**: no run has finished; the measured columns fill in as runs "
                  "finish.", ""]
    recipe = (f"{args.epochs} epochs instead of 240 (milestones and stages scaled)" if args.epochs
              else "the 240-epoch recipe of each config")
    if args.max_steps:
        recipe += f", at most {args.max_steps} optimizer steps per run"
    devices = "one device per run" if args.devices == 1 else f"DDP on {args.devices} devices per run"
    lines += [f"Measured: test top-1 (%) of the checkpoint with the best validation accuracy, one "
              f"run each (the config's seed); {recipe}; {devices}; trained on 90% of the training "
              f"set with 10% held out for validation (45k / 5k). Published: RepDistiller keeps the best "
              f"test accuracy over the epochs of a run on all 50k training images; the other "
              f"sources report their papers' figures.",
              "",
              "Command: `python benchmarks/cifar100_table.py " + shlex.join(args.argv) + "`"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arguments after -- go to every kd-lightning fit command.")
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), metavar="PAIR",
                   help=f"teacher_student pairs (default: all of {', '.join(PAIRS)})")
    p.add_argument("--methods", nargs="+", default=None, metavar="KEY",
                   help="rows besides the teacher: `student` and method keys of "
                        "configs/cifar100/<key>_<pair>.yaml (default: student and every known or "
                        "existing method)")
    p.add_argument("--epochs", type=int, default=None,
                   help="replace the recipe's 240 epochs (LR milestones and stage lengths scale along)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop every run after this many optimizer steps")
    p.add_argument("--data-root", default="data", help="folder holding cifar-100-python/ (default: data)")
    p.add_argument("--devices", type=int, default=1,
                   help="devices per run; > 1 trains with DDP (global batch kept at 64, synced BN)")
    p.add_argument("--strategy", default=None,
                   help="DDP strategy for --devices > 1 (default: ddp, or "
                        "ddp_find_unused_parameters_true for two-stage methods)")
    p.add_argument("--teacher-ckpt", action="append", default=[], metavar="NAME=PATH",
                   help="use this checkpoint for teacher NAME (e.g. resnet56=ckpt/resnet56.ckpt) "
                        "instead of training it")
    p.add_argument("--out", default="runs/cifar100_table",
                   help="output folder: table.md, results.jsonl, runs/ (default: runs/cifar100_table)")
    p.add_argument("--config-dir", default=str(CONFIG_DIR), help=argparse.SUPPRESS)
    p.add_argument("--synthetic", action="store_true",
                   help="fake CIFAR-100-shaped data in a temporary folder (CPU smoke run)")
    args = p.parse_args(argv)
    args.extra = extra
    args.argv = argv + (["--", *extra] if extra else [])
    unknown = [x for x in args.pairs if x not in PAIRS]
    if unknown:
        raise KDConfigError(f"unknown pair(s) {unknown}; valid pairs: {', '.join(PAIRS)}.")
    if args.max_steps is not None and args.max_steps < 1:
        raise KDConfigError(f"--max-steps must be >= 1, got {args.max_steps}.")
    ckpts = {}
    for item in args.teacher_ckpt:
        name, sep, path = item.partition("=")
        teachers = {t for t, _ in PAIRS.values()}
        if not sep or name not in teachers:
            raise KDConfigError(f"--teacher-ckpt takes NAME=PATH with NAME one of {sorted(teachers)}; "
                                f"got '{item}'.")
        if not Path(path).is_file():
            raise KDConfigError(f"--teacher-ckpt {item}: file '{path}' does not exist.")
        ckpts[name] = Path(path).resolve()
    args.teacher_ckpts = ckpts
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except KDConfigError as err:
        print(f"cifar100_table: error: {err}", file=sys.stderr)
        return 2
    published = load_published()
    config_dir = Path(args.config_dir)
    all_methods = discover_methods(config_dir, args.pairs)
    methods = list(dict.fromkeys(args.methods if args.methods is not None else ["student", *all_methods]))
    bad = [m for m in methods if m == "teacher" or not m.replace("_", "").isalnum()]
    if bad:
        print(f"cifar100_table: error: invalid method key(s) {bad}; the teacher row is always "
              f"included. Known keys: student, {', '.join(all_methods)}.", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    common = [*(["--trainer.max_steps", str(args.max_steps)] if args.max_steps else []), *args.extra]
    info = {"synthetic": args.synthetic, "epochs": args.epochs, "max_steps": args.max_steps,
            "devices": args.devices}
    import torch

    table = plan(args.pairs, methods, config_dir, common, args.epochs, args.devices, args.strategy,
                 args.teacher_ckpts, data="synthetic" if args.synthetic else "cifar100",
                 sync_bn=torch.cuda.is_available())  # SyncBatchNorm runs on GPUs only
    rows = ["teacher", *methods]
    results = Results(out / "results.jsonl")
    table_path = out / "table.md"
    isolate = args.devices > 1

    def write_table() -> None:
        n_done = sum(isinstance(r, Run) and r.status == "done" for p in table.values() for r in p.values())
        table_path.parent.mkdir(parents=True, exist_ok=True)
        table_path.write_text(format_table(table, rows, published, make_header(args, n_done)))

    with contextlib.ExitStack() as stack:
        if args.synthetic:
            data_root = write_synthetic_cifar100(Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="cifar100_synthetic_"))))
        else:
            data_root = Path(args.data_root).resolve()
            missing = [f for f in ("train", "test", "meta")
                       if not (data_root / "cifar-100-python" / f).is_file()]
            if missing:
                print(f"cifar100_table: error: CIFAR-100 not found: {data_root / 'cifar-100-python'} lacks "
                      f"{', '.join(missing)}. Extract the python version of CIFAR-100 "
                      f"(cifar-100-python.tar.gz) under --data-root, or pass --synthetic for a smoke "
                      f"run on fake data.", file=sys.stderr)
                return 2
        for pair, pair_runs in table.items():
            for key in rows:
                run = pair_runs.get(key)
                if isinstance(run, Run):
                    execute(run, out, data_root, results, isolate, info)
                    write_table()
                elif run is not None:
                    print(f"[skip]    {pair:22s} {key:10s} {run}")
    write_table()
    print(f"\ntable: {table_path}\nresults: {results.path}")
    print(table_path.read_text())
    failed = [r for p in table.values() for r in p.values() if isinstance(r, Run) and r.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
