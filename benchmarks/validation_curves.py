"""Did a study's runs train long enough? Validation curves of a study that validated every epoch.

A study's runs log ``val/acc`` every epoch when its ``args`` turn validation on (e.g.
``--trainer.limit_val_batches=0.25``; the Kong et al. Table 3 study's ``row_500`` and ``row_1000``
presets do). For every method and budget M of the study's ``results.csv`` this prints the mean
over seeds of the validation accuracy (%) at 25, 50, 75 and 100% of the run, its best epoch, and
the rise over the last quarter (final minus the value at 75%): a run whose accuracy has stopped
rising gains about nothing there. A grid method's curve is its chosen candidate's.

``--save CURVES.csv`` writes the curves read (one row per run and epoch: method, M, seed,
epoch, val_acc), keeping the file's runs that were not read again, and a ``.csv`` given as a
source is read like a study folder: a study trained in several sessions or on several machines
keeps its curves beside its ``results.csv`` without its TensorBoard logs.

Run::

    python benchmarks/validation_curves.py studies/fashion_mnist_kong-row_500 [more folders]
    python benchmarks/validation_curves.py FOLDER --plot curves.png   # the curves, one panel per M
    python benchmarks/validation_curves.py FOLDER --save curves.csv   # and later: curves.csv
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


Run = tuple[str, str, int]  # (method, M, seed)
FIELDS = ("method", "M", "seed", "epoch", "val_acc")


def study_curves(folder: Path) -> dict[Run, list[float]]:
    """(method, M, seed) -> the run's curve, for the tested runs (plain runs and chosen
    candidates): each run's first ``epochs`` validations, one per epoch (a grid candidate's final
    measurement on the whole validation split follows them and is not part of the curve)."""
    with open(folder / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("kind", "run") in ("run", "chosen")]
    out: dict[Run, list[float]] = {}
    for r in rows:
        c = curve(Path(r["run_dir"]))[:int(r["epochs"])]
        if c:
            out[(r["method"], r["M"], int(r["seed"]))] = c
    return out


def read_saved(path: Path) -> dict[Run, list[float]]:
    """The curves a ``--save`` file holds (epochs in order, 1-based)."""
    out: dict[Run, dict[int, float]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault((r["method"], r["M"], int(r["seed"])), {})[int(r["epoch"])] = float(r["val_acc"])
    return {run: [by_epoch[e] for e in sorted(by_epoch)] for run, by_epoch in out.items()}


def save(path: Path, runs: dict[Run, list[float]]) -> None:
    """Write ``runs`` to ``path`` (one row per run and epoch), after the runs ``path`` already
    holds that ``runs`` does not."""
    merged = {**(read_saved(path) if path.is_file() else {}), **runs}
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(FIELDS)
        for (method, m, seed), c in sorted(merged.items(), key=lambda kv: (budget_order(kv[0][1]), kv[0])):
            w.writerows((method, m, seed, epoch, f"{v:.4f}") for epoch, v in enumerate(c, start=1))


def by_budget(runs: dict[Run, list[float]]) -> dict[tuple[str, str], list[list[float]]]:
    """(method, M) -> its seeds' curves, in seed order."""
    out: dict[tuple[str, str], list[list[float]]] = {}
    for (method, m, _), c in sorted(runs.items(), key=lambda kv: kv[0][2]):
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
    ap.add_argument("sources", nargs="+", type=Path,
                    help="study output folders, or curves saved with --save (.csv)")
    ap.add_argument("--plot", type=Path, help="write the mean curves to this PNG")
    ap.add_argument("--save", type=Path, help="write the runs' curves to this CSV (keeping its other runs)")
    args = ap.parse_args()
    runs: dict[Run, list[float]] = {}
    for source in args.sources:
        runs.update(read_saved(source) if source.suffix == ".csv" else study_curves(source))
    if not runs:
        raise SystemExit(f"no validation curves in {[str(f) for f in args.sources]}: the study's runs did not "
                         f"validate (give the study args: [--trainer.limit_val_batches=0.25]).")
    if args.save:
        save(args.save, runs)
        print(f"wrote {args.save}")
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
