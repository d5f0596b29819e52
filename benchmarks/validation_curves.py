"""Did a study's runs train long enough? Validation curves of a study that validated every epoch.

A study's runs log ``val/acc`` every epoch when its ``args`` turn validation on (e.g.
``--trainer.limit_val_batches=0.25``; the Kong et al. Table 3 study's ``row_500`` and ``row_1000``
presets do). For every method and budget M of the study's ``results.csv`` this prints the mean
over seeds of the validation accuracy (%) at 25, 50, 75 and 100% of the run, its best epoch, and
the rise over the last quarter (final minus the value at 75%): a run whose accuracy has stopped
rising gains about nothing there. A grid method's curve is its chosen candidate's.

A study folder's ``curves.csv`` (one row per run and epoch: method, M, seed, candidate, epoch,
val_acc) keeps its curves once its TensorBoard logs are gone: a run whose logs are not found is
read from it. ``--save`` writes it, from every run's logs (grid candidates included, so a grid
chosen in a later session still has its chosen candidate's curve) and the runs it held already.
A study trained in several sessions or on several machines keeps ``results.csv``, ``study.json``
and ``curves.csv``, and this script tables it from those alone.

Run::

    python benchmarks/validation_curves.py studies/fashion_mnist_kong-row_500 [more folders]
    python benchmarks/validation_curves.py FOLDER --plot curves.png   # the curves, one panel per M
    python benchmarks/validation_curves.py FOLDER --save   # FOLDER/curves.csv, read when the logs are gone
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

QUARTERS = (0.25, 0.5, 0.75, 1.0)


def budget_order(label: str) -> int:
    """Budgets in increasing order, ``full`` last."""
    return int(label) if label.isdigit() else 10**9


def curve(run_dir: Path) -> list[float]:
    """``val/acc`` (%) per validation, in order, from a run's TensorBoard log: its last
    ``version_N`` (a run interrupted and trained again from the start logs into the next version;
    one resumed from its checkpoint logs into the same one, and where both attempts logged a step
    the later value is the run's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = [p for p in run_dir.glob("version_*") if p.name.split("_")[-1].isdigit()]
    if not versions:
        return []
    last = max(versions, key=lambda p: int(p.name.split("_")[-1]))
    acc = EventAccumulator(str(last), size_guidance={"scalars": 0})
    acc.Reload()
    if "val/acc" not in acc.Tags()["scalars"]:
        return []
    by_step = {e.step: e.value for e in sorted(acc.Scalars("val/acc"), key=lambda e: e.wall_time)}
    return [100 * by_step[step] for step in sorted(by_step)]


Run = tuple[str, str, int, str]  # (method, M, seed, candidate)
FIELDS = ("method", "M", "seed", "candidate", "epoch", "val_acc")
TESTED, TRAINED = ("run", "chosen"), ("run", "candidate")


def _rows(folder: Path, kinds: tuple[str, ...]) -> list[dict]:
    with open(folder / "results.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("kind", "run") in kinds]


def _key(row: dict) -> Run:
    return row["method"], row["M"], int(row["seed"]), row.get("candidate") or ""


def study_curves(folder: Path) -> dict[Run, list[float]]:
    """(method, M, seed, candidate) -> the run's curve, for the tested runs (plain runs and
    chosen candidates): each run's first ``epochs`` validations, one per epoch (a grid
    candidate's final measurement on the whole validation split follows them and is not part of
    the curve), from its logs or else from the folder's ``curves.csv``."""
    saved = read_saved(folder / "curves.csv")
    out: dict[Run, list[float]] = {}
    for r in _rows(folder, TESTED):
        c = curve(Path(r["run_dir"]))[:int(r["epochs"])] or saved.get(_key(r), [])
        if c:
            out[_key(r)] = c
    return out


def read_saved(path: Path) -> dict[Run, list[float]]:
    """The curves a ``curves.csv`` holds (epochs in order); none if there is no such file."""
    out: dict[Run, dict[int, float]] = {}
    if path.is_file():
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                out.setdefault(_key(r), {})[int(r["epoch"])] = float(r["val_acc"])
    return {run: [by_epoch[e] for e in sorted(by_epoch)] for run, by_epoch in out.items()}


def save(folder: Path) -> Path:
    """Write ``folder/curves.csv``: every trained run's curve from its logs (plain runs and grid
    candidates), and the file's own curves of the runs whose logs are gone."""
    runs = read_saved(folder / "curves.csv")
    for r in _rows(folder, TRAINED):
        c = curve(Path(r["run_dir"]))[:int(r["epochs"])]
        if c:
            runs[_key(r)] = c
    path = folder / "curves.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(FIELDS)
        for run, c in sorted(runs.items(), key=lambda kv: (budget_order(kv[0][1]), kv[0])):
            w.writerows((*run, epoch, f"{v:.4f}") for epoch, v in enumerate(c, start=1))
    return path


def by_budget(runs: dict[Run, list[float]]) -> dict[tuple[str, str], list[list[float]]]:
    """(method, M) -> its seeds' curves, in seed order."""
    out: dict[tuple[str, str], list[list[float]]] = {}
    for (method, m, _, _), c in sorted(runs.items(), key=lambda kv: kv[0][2]):
        out.setdefault((method, m), []).append(c)
    return out


def summary(curves: list[list[float]]) -> tuple[list[float], int, float]:
    """Mean over seeds at each quarter of the run, the best epoch of the mean curve (1-based),
    and the rise over the last quarter."""
    n = min(map(len, curves))
    mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
    at = [mean[max(0, round(q * n) - 1)] for q in QUARTERS]
    return at, 1 + max(range(n), key=mean.__getitem__), at[-1] - at[-2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="study output folders")
    ap.add_argument("--plot", type=Path, help="write the mean curves to this PNG")
    ap.add_argument("--save", action="store_true",
                    help="write each folder's curves.csv (its runs' curves, kept once the logs are gone)")
    args = ap.parse_args()
    for folder in args.folders if args.save else ():
        print(f"wrote {save(folder)}")
    runs = {k: v for folder in args.folders for k, v in study_curves(folder).items()}
    if not runs:
        raise SystemExit(f"no validation curves in {[str(f) for f in args.folders]}: the study's runs did not "
                         f"validate (give the study args: [--trainer.limit_val_batches=0.25]).")
    found = by_budget(runs)
    print("| M | method | seeds | epochs | val acc at 25% | 50% | 75% | 100% | best epoch | last-quarter rise |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (method, m), curves in sorted(found.items(), key=lambda kv: (budget_order(kv[0][1]), kv[0][0])):
        at, best, rise = summary(curves)
        cells = " | ".join(f"{v:.2f}" for v in at)
        print(f"| {m} | {method} | {len(curves)} | {min(map(len, curves))} | {cells} | {best} | {rise:+.2f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        budgets = sorted({m for _, m in found}, key=budget_order)
        methods = sorted({name for name, _ in found})
        colour = dict(zip(methods, plt.get_cmap("tab10").colors))  # one colour per method in every panel
        fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.8), squeeze=False)
        for ax, m in zip(axes[0], budgets):
            for (method, mm), curves in sorted(found.items()):
                if mm == m:
                    n = min(map(len, curves))
                    ax.plot(range(1, n + 1), [statistics.fmean(c[i] for c in curves) for i in range(n)],
                            marker=".", label=method, color=colour[method])
            ax.set(title=f"M = {m}", xlabel="epoch", ylabel="validation accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
