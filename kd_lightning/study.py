"""``kd-lightning-study``: which distillation method works best at my data budget?

Trains the teacher once (cached by its configuration), then for every method in the study
config, every budget ``M`` and every seed trains the student on the stratified subset through
the same Lightning path as ``kd-lightning fit`` and tests it. Prints the table in the layout of
Kong et al. (2020) (rows M, columns methods, mean ± std over seeds, best per row marked) and writes
``results.md``, ``results.csv`` (one row per run) and ``accuracy_vs_m.png`` into the output folder,
with every run's TensorBoard logs beside them. Results are appended as each run finishes, so
rerunning the same command after an interruption skips the runs already done.

Study config (YAML)::

    name: mnist1d
    output: studies/mnist1d                 # results folder (overridable with --output)
    teacher: {config: configs/mnist1d/teacher.yaml, args: []}
    budgets: [50, 100, 500, 1000, full]     # M per run; `full` = the whole training split
    seeds: [0, 1, 2]
    steps: 3000                             # optimizer steps per student run, whatever M is
    epoch_args:                             # run arguments set to a fraction of the run's epochs
      model.init_args.lr_scheduler.init_args.T_max: 1.0
    args: []                                # extra CLI arguments for every student run
    methods:
      - {name: student alone, config: configs/mnist1d/student.yaml, reference: true}
      - {name: ResponseKD, config: configs/mnist1d/response.yaml}
    presets:
      quick: {budgets: [50, 100, 500, full], seeds: [0, 1], steps: 800}

A method appears in the study by adding an entry here; no code changes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd_lightning import KDConfigError

CSV_FIELDS = ["study_hash", "method", "M", "seed", "test_acc", "teacher_acc", "epochs", "steps",
              "wall_time_s", "run_hash", "run_dir", "finished_at"]
FULL = "full"


# ------------------------------------------------------------------------------------------
# configuration


@dataclass
class MethodSpec:
    name: str
    config: str
    args: list[str] = field(default_factory=list)
    epoch_args: dict[str, float] = field(default_factory=dict)
    reference: bool = False  # the student-alone baseline: drawn as a reference line
    method: str | None = None  # class name, checked against the config's model.class_path


@dataclass
class StudySpec:
    name: str
    output: str
    teacher_config: str
    teacher_args: list[str]
    budgets: list[int | None]
    seeds: list[int]
    steps: int
    methods: list[MethodSpec]
    args: list[str] = field(default_factory=list)
    epoch_args: dict[str, float] = field(default_factory=dict)
    base_dir: str = "."

    def resolve(self, path: str) -> str:
        p = Path(path)
        if p.is_absolute() or p.exists():
            return str(p)
        return str(Path(self.base_dir) / p)

    def identity(self) -> dict:
        """What makes two studies the same study (results are comparable)."""
        def digest(path: str) -> str:
            return hashlib.sha256(Path(self.resolve(path)).read_bytes()).hexdigest()[:16]

        return {
            "name": self.name,
            "teacher": {"config": digest(self.teacher_config), "args": self.teacher_args},
            "steps": self.steps, "args": self.args, "epoch_args": self.epoch_args,
            "methods": [{"name": m.name, "config": digest(m.config), "args": m.args,
                         "epoch_args": m.epoch_args} for m in self.methods],
        }

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:12]


def available_methods() -> dict[str, type]:
    """Every LightningModule of :mod:`kd_lightning.methods` (subclasses of the base class)."""
    import kd_lightning.methods as methods

    base = methods.DistillationModule
    return {name: obj for name, obj in vars(methods).items()
            if isinstance(obj, type) and issubclass(obj, base) and obj is not base}


def _budget(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() == FULL):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KDConfigError(f"budget {value!r} in the study config is not a positive integer or "
                            f"'{FULL}'.")
    return value


def load_study(path: str | Path, preset: str | None = None) -> StudySpec:
    path = Path(path)
    if not path.is_file():
        raise KDConfigError(f"study config '{path}' does not exist.")
    raw = yaml.safe_load(path.read_text()) or {}
    if preset is not None:
        presets = raw.get("presets", {})
        if preset not in presets:
            raise KDConfigError(f"preset '{preset}' is not defined in {path}; defined presets: "
                                f"{', '.join(presets) or 'none'}.")
        raw = {**raw, **presets[preset]}
    for key in ("teacher", "methods"):
        if key not in raw:
            raise KDConfigError(f"study config {path} has no '{key}' section.")
    valid = available_methods()
    methods = []
    for entry in raw["methods"]:
        spec = MethodSpec(**entry)
        if spec.method is not None and spec.method not in valid:
            raise KDConfigError(
                f"unknown method '{spec.method}' in study config {path}. Valid methods: "
                f"{', '.join(sorted(valid))}.")
        methods.append(spec)
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise KDConfigError(f"method names in {path} must be unique, got {names}.")
    teacher = raw["teacher"]
    spec = StudySpec(
        name=str(raw.get("name", path.stem)), output=str(raw.get("output", f"studies/{path.stem}")),
        teacher_config=teacher["config"], teacher_args=[str(a) for a in teacher.get("args", [])],
        budgets=[_budget(b) for b in raw.get("budgets", [50, 100, 500, 1000, FULL])],
        seeds=[int(s) for s in raw.get("seeds", [0, 1, 2])], steps=int(raw.get("steps", 2000)),
        methods=methods, args=[str(a) for a in raw.get("args", [])],
        epoch_args={str(k): float(v) for k, v in (raw.get("epoch_args") or {}).items()},
        base_dir=str(Path.cwd()))
    for m in spec.methods:  # every referenced config must exist and name a known method
        cfg_path = Path(spec.resolve(m.config))
        if not cfg_path.is_file():
            raise KDConfigError(f"method '{m.name}': config '{m.config}' does not exist.")
        class_path = (yaml.safe_load(cfg_path.read_text()).get("model") or {}).get("class_path", "")
        cls_name = class_path.rsplit(".", 1)[-1]
        if m.method is not None and cls_name != m.method:
            raise KDConfigError(f"method '{m.name}' says method: {m.method} but its config "
                                f"{m.config} trains {class_path}.")
        if class_path.startswith("kd_lightning.methods.") and cls_name not in valid:
            raise KDConfigError(
                f"unknown method '{cls_name}' in {m.config} (study entry '{m.name}'). Valid "
                f"methods: {', '.join(sorted(valid))}.")
    if not Path(spec.resolve(spec.teacher_config)).is_file():
        raise KDConfigError(f"teacher config '{spec.teacher_config}' does not exist.")
    return spec


# ------------------------------------------------------------------------------------------
# running


def _config_data(path: str) -> dict:
    return (yaml.safe_load(Path(path).read_text()) or {}).get("data", {}) or {}


def _data_module(cfg_path: str, budget: int | None, seed: int, extra: list[str]):
    """The DistillDataModule a run would build (checks the budget is possible)."""
    from kd_lightning.data import DistillDataModule

    data = dict(_config_data(cfg_path))
    for flag, value in zip(extra[::2], extra[1::2]):  # honour --data.* overrides
        if flag.startswith("--data."):
            data[flag[len("--data."):]] = yaml.safe_load(value)
    data.update(train_subset=budget, subset_seed=seed)
    return DistillDataModule(**data)


def _epochs_for(steps: int, n_train: int, batch_size: int, drop_last: bool = False) -> int:
    per_epoch = n_train // batch_size if drop_last else math.ceil(n_train / batch_size)
    return max(1, round(steps / max(per_epoch, 1)))


def _needs_subprocess(args: list[str]) -> bool:
    """Multi-process strategies re-launch the command, so such runs go into a subprocess."""
    joined = " ".join(args)
    return "ddp" in joined or "--trainer.num_nodes" in joined


def run_fit(args: list[str], isolate: bool, log_file: Path) -> dict[str, float]:
    """One ``kd-lightning fit`` run; returns its final callback metrics (floats)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if isolate:
        metrics_file = log_file.with_suffix(".metrics.json")
        code = ("import json, sys; from kd_lightning.cli import cli_main; "
                "cli = cli_main(sys.argv[1:]); "
                "rank = cli.trainer.global_rank; "
                f"rank == 0 and open({str(metrics_file)!r}, 'w').write(json.dumps("
                "{k: float(v) for k, v in cli.trainer.callback_metrics.items()}))")
        with open(log_file, "w") as log:
            proc = subprocess.run([sys.executable, "-c", code, *args], stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"exit status {proc.returncode}: {_last_lines(log_file.read_text())}")
        return json.loads(metrics_file.read_text())
    from kd_lightning.cli import cli_main

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = cli_main(args)
    except SystemExit as exc:  # argument or configuration error inside the run
        raise RuntimeError(f"exit status {exc.code}: {_last_lines(buffer.getvalue())}") from None
    finally:
        log_file.write_text(buffer.getvalue())
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def _last_lines(text: str, n: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-n:])


class StudyRunner:
    def __init__(self, spec: StudySpec, output: Path, trainer_args: list[str], overwrite: bool,
                 teacher_cache: Path, progress: bool = True) -> None:
        self.spec, self.output, self.trainer_args = spec, output, trainer_args
        self.overwrite, self.teacher_cache, self.progress = overwrite, teacher_cache, progress
        self.study_hash = spec.hash()
        self.csv_path = output / "results.csv"

    # ---- output folder ------------------------------------------------------------------
    def prepare_output(self) -> None:
        meta = self.output / "study.json"
        if self.output.exists() and any(self.output.iterdir()):
            old = json.loads(meta.read_text()).get("hash") if meta.is_file() else None
            if old != self.study_hash:
                if not self.overwrite:
                    what = (f"results of a different study (hash {old})" if old
                            else "files that are not a study's results")
                    raise KDConfigError(
                        f"output folder {self.output} holds {what}; this study's hash is "
                        f"{self.study_hash}. Pass --overwrite to delete them and start afresh, "
                        f"--output DIR to write elsewhere, or rerun the original study config "
                        f"to resume it.")
                shutil.rmtree(self.output)
        self.output.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"hash": self.study_hash, "identity": self.spec.identity()},
                                   indent=2))

    def completed(self) -> dict[tuple[str, str, int], dict]:
        if not self.csv_path.is_file():
            return {}
        with open(self.csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("study_hash") == self.study_hash]
        return {(r["method"], r["M"], int(r["seed"])): r for r in rows}

    def append(self, row: dict) -> None:
        new = not self.csv_path.is_file()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())

    # ---- teacher --------------------------------------------------------------------------
    def teacher_checkpoint(self) -> tuple[Path, float | None]:
        spec = self.spec
        cfg = spec.resolve(spec.teacher_config)
        key = hashlib.sha256((Path(cfg).read_text() + json.dumps(spec.teacher_args)
                              + json.dumps(self.trainer_args)).encode()).hexdigest()[:16]
        folder = self.teacher_cache / key
        ckpt, info = folder / "teacher.ckpt", folder / "teacher.json"
        if ckpt.is_file() and info.is_file():
            return ckpt, json.loads(info.read_text()).get("test_acc")
        folder.mkdir(parents=True, exist_ok=True)
        args = ["fit", "--config", cfg, *spec.teacher_args,
                "--trainer.logger.init_args.save_dir", str(folder),
                "--trainer.logger.init_args.name", "teacher",
                "--trainer.enable_progress_bar", "false", *self.trainer_args]
        try:
            metrics = run_fit(args, _needs_subprocess(self.trainer_args), folder / "teacher.log")
        except Exception as err:  # noqa: BLE001
            raise KDConfigError(f"the teacher run failed ({err}); see {folder / 'teacher.log'}. "
                                f"Results already written are kept.") from None
        best = self._find_teacher_ckpt(folder, cfg)
        shutil.copyfile(best, ckpt)
        info.write_text(json.dumps({"config": cfg, "args": spec.teacher_args,
                                    "test_acc": metrics.get("test/acc"), "source": str(best)}))
        return ckpt, metrics.get("test/acc")

    @staticmethod
    def _find_teacher_ckpt(folder: Path, cfg: str) -> Path:
        found = sorted(folder.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        for callback in (yaml.safe_load(Path(cfg).read_text()).get("trainer", {}) or {}).get(
                "callbacks", []) or []:
            dirpath = (callback.get("init_args") or {}).get("dirpath")
            if dirpath:
                found += sorted(Path(dirpath).glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        best = [p for p in found if p.name.startswith("best")]
        if not (best or found):
            raise KDConfigError(f"the teacher run wrote no checkpoint (config {cfg}); give it a "
                                f"ModelCheckpoint callback.")
        return (best or found)[-1]

    # ---- cells ----------------------------------------------------------------------------
    def cells(self) -> list[tuple[MethodSpec, int | None, int]]:
        return [(m, b, s) for b in self.spec.budgets for m in self.spec.methods for s in self.spec.seeds]

    def check_budgets(self) -> None:
        for m in self.spec.methods:
            for b in self.spec.budgets:
                try:
                    _data_module(self.spec.resolve(m.config), b, self.spec.seeds[0], m.args + self.spec.args)
                except KDConfigError as err:
                    raise KDConfigError(f"budget M={b if b is not None else FULL} cannot be run for "
                                        f"method '{m.name}': {err}") from None

    def run_cell(self, m: MethodSpec, budget: int | None, seed: int, teacher_ckpt: Path) -> dict:
        spec = self.spec
        cfg = spec.resolve(m.config)
        extra = [*spec.args, *m.args]
        dm = _data_module(cfg, budget, seed, extra)
        epochs = _epochs_for(spec.steps, len(dm.train_indices), dm.batch_size, dm.drop_last)
        m_label = FULL if budget is None else str(budget)
        run_name = f"{_slug(m.name)}/M{m_label}/seed{seed}"
        args = ["fit", "--config", cfg, *extra,
                "--seed_everything", str(seed),
                "--data.train_subset", "null" if budget is None else str(budget),
                "--data.subset_seed", str(seed),
                "--trainer.max_epochs", str(epochs), "--trainer.max_steps", "-1",
                "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
                "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false",
                "--trainer.logger.init_args.save_dir", str(self.output / "runs"),
                "--trainer.logger.init_args.name", run_name,
                "--test_after_fit", "true"]
        if _has_teacher(cfg):
            args += ["--model.init_args.teacher_checkpoint", str(teacher_ckpt)]
        for key, frac in {**spec.epoch_args, **m.epoch_args}.items():
            if _has_key(cfg, key):
                args += [f"--{key}", str(max(1, round(frac * epochs)))]
        args += self.trainer_args
        run_hash = hashlib.sha256(json.dumps(args[2:]).encode()).hexdigest()[:12]
        start = time.perf_counter()
        log_file = self.output / "runs" / run_name / "run.log"
        try:
            metrics = run_fit(args, _needs_subprocess(self.trainer_args), log_file)
        except KDConfigError:
            raise
        except Exception as err:  # noqa: BLE001
            raise RuntimeError(f"run {run_name} failed: {err} (log: {log_file})") from err
        return {"study_hash": self.study_hash, "method": m.name, "M": m_label, "seed": seed,
                "test_acc": round(100 * metrics["test/acc"], 3),
                "teacher_acc": round(100 * metrics["test/teacher_acc"], 3)
                if "test/teacher_acc" in metrics else "",
                "epochs": epochs, "steps": epochs * math.ceil(len(dm.train_indices) / dm.batch_size),
                "wall_time_s": round(time.perf_counter() - start, 2), "run_hash": run_hash,
                "run_dir": str(self.output / "runs" / run_name),
                "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}

    # ---- the study --------------------------------------------------------------------------
    def run(self) -> str:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.check_budgets()
        self.prepare_output()
        done = self.completed()
        cells = self.cells()
        todo = [c for c in cells if (c[0].name, FULL if c[1] is None else str(c[1]), c[2]) not in done]
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
        from rich.console import Console

        console = Console(file=sys.stdout)  # bound now: runs redirect sys.stdout into their logs
        with Progress(*columns, console=console, disable=not self.progress, transient=False) as bar:
            task = bar.add_task("teacher", total=len(cells), completed=len(cells) - len(todo))
            teacher_ckpt, teacher_acc = self.teacher_checkpoint()
            self.teacher_acc = teacher_acc
            for m, budget, seed in todo:
                bar.update(task, description=f"{m.name} M={budget or FULL} seed={seed}")
                self.append(self.run_cell(m, budget, seed, teacher_ckpt))
                bar.advance(task)
            bar.update(task, description="done")
        return self.report()

    def report(self) -> str:
        rows = list(self.completed().values())
        table = format_table(rows, [m.name for m in self.spec.methods], self.spec.budgets)
        teacher_acc = getattr(self, "teacher_acc", None)
        header = (f"# Study `{self.spec.name}` (hash {self.study_hash})\n\n"
                  f"Test accuracy (%) of the student, mean ± std over seeds "
                  f"{self.spec.seeds}; best per row in bold. {self.spec.steps} optimizer steps per "
                  f"run. Teacher: {teacher_acc * 100:.2f}%.\n\n" if teacher_acc is not None else
                  f"# Study `{self.spec.name}`\n\n")
        (self.output / "results.md").write_text(header + table + "\n")
        plot_results(rows, self.spec, self.output / "accuracy_vs_m.png",
                     None if teacher_acc is None else 100 * teacher_acc)
        return table


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _has_teacher(cfg: str) -> bool:
    init = ((yaml.safe_load(Path(cfg).read_text()) or {}).get("model") or {}).get("init_args") or {}
    return bool(init.get("teacher"))


def _has_key(cfg: str, dotted: str) -> bool:
    node: Any = yaml.safe_load(Path(cfg).read_text()) or {}
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# ------------------------------------------------------------------------------------------
# table and plot


def _stats(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def format_table(rows: list[dict], methods: list[str], budgets: list[int | None]) -> str:
    """Kong et al.'s layout: rows M, columns methods, ``mean ± std`` over seeds, best in bold."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        acc.setdefault((r["method"], str(r["M"])), []).append(float(r["test_acc"]))
    lines = ["| M | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for b in budgets:
        label = FULL if b is None else str(b)
        stats = {m: _stats(acc[(m, label)]) for m in methods if (m, label) in acc}
        if not stats:
            continue
        best = max(s[0] for s in stats.values())
        cells = []
        for m in methods:
            if m not in stats:
                cells.append("–")
                continue
            mean, std = stats[m]
            cell = f"{mean:.2f} ± {std:.2f}"
            cells.append(f"**{cell}**" if math.isclose(mean, best, abs_tol=1e-9) else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(rows: list[dict], spec: StudySpec, path: Path, teacher_acc: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [b for b in spec.budgets if b is not None]
    full_x = (max(numeric) * 2) if numeric else 1
    xs = {(FULL if b is None else str(b)): (full_x if b is None else b) for b in spec.budgets}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2])
    for m in spec.methods:
        pts = []
        for label, x in xs.items():
            vals = [float(r["test_acc"]) for r in rows if r["method"] == m.name and str(r["M"]) == label]
            if vals:
                pts.append((x, *_stats(vals)))
        if not pts:
            continue
        pts.sort()
        x, mean, std = zip(*pts)
        style = dict(linestyle="--", color="black", marker="s") if m.reference else {"marker": "o"}
        line, = ax.plot(x, mean, label=m.name, **style)
        ax.fill_between(x, [a - s for a, s in zip(mean, std)], [a + s for a, s in zip(mean, std)],
                        alpha=0.15, color=line.get_color())
    if teacher_acc is not None:
        ax.axhline(teacher_acc, color="firebrick", linestyle=":", linewidth=2,
                   label=f"teacher ({teacher_acc:.1f}%)")
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, max(top, teacher_acc + 2))
    ax.set_xscale("log")
    ax.set_xticks(list(xs.values()))
    ax.set_xticklabels(list(xs.keys()))
    ax.set_xlabel("labelled training examples M")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{spec.name}: student accuracy vs data budget (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kd-lightning-study", description=__doc__.split("\n\n")[0],
        epilog="Any --trainer.* flag (e.g. --trainer.devices 2 --trainer.strategy ddp, "
               "--trainer.precision bf16-mixed) is passed to every run.")
    parser.add_argument("--config", required=True, help="study config (YAML)")
    parser.add_argument("--preset", default=None, help="a preset of the study config, e.g. quick")
    parser.add_argument("--output", default=None, help="results folder (default: from the config)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an output folder that holds a different study's results")
    parser.add_argument("--teacher-cache", default=None,
                        help="where trained teachers are kept (default: <output>/../_teachers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("--") and not a.startswith("--trainer.")]
    if bad:
        parser.error(f"unknown arguments {bad}: only --trainer.* flags are passed to the runs")
    try:
        spec = load_study(args.config, args.preset)
        if args.preset:
            spec.name = f"{spec.name}-{args.preset}"
        output = Path(args.output or (spec.output + (f"-{args.preset}" if args.preset else "")))
        cache = Path(args.teacher_cache) if args.teacher_cache else output.parent / "_teachers"
        runner = StudyRunner(spec, output, rest, args.overwrite, cache, progress=not args.no_progress)
        logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
        logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
        table = runner.run()
    except KDConfigError as err:
        print(f"kd-lightning-study: error: {err}", file=sys.stderr)
        return 2
    print()
    print(table)
    print(f"\nwrote {output / 'results.md'}, {output / 'results.csv'}, {output / 'accuracy_vs_m.png'}"
          f" and TensorBoard runs in {output / 'runs'}")
    return 0


def cli() -> None:
    """Console script ``kd-lightning-study``."""
    raise SystemExit(main())


if __name__ == "__main__":  # pragma: no cover
    cli()
