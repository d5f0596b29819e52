"""The study's report, built from results.csv alone: ``results.md`` and ``accuracy_vs_m.png``.

The table has Kong et al. (2020)'s layout: rows M, columns methods, test accuracy as
``mean ± std`` over seeds (the mean alone where a cell holds one run), best per row in bold.
Methods with a grid get a second table: the candidate chosen per M on validation accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path

from kd_lightning.study.results import FAILED, RUN, candidate_key, candidate_label, choose
from kd_lightning.study.spec import Budget, StudySpec, budget_label


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _test_accuracies(rows: list[dict]) -> dict[tuple[str, str], list[float]]:
    acc: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.get("test_acc") not in (None, ""):
            acc.setdefault((r["method"], str(r["M"])), []).append(float(r["test_acc"]))
    return acc


def format_table(rows: list[dict], methods: list[str], budgets: list[Budget]) -> str:
    """Rows M, columns methods, ``mean ± std`` of test accuracy over seeds, best in bold.

    A cell with one run shows its accuracy alone (no ``± 0.00``); budgets without results have
    no row.
    """
    acc = _test_accuracies(rows)
    lines = ["| M | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for b in budgets:
        label = budget_label(b)
        stats = {m: (*_stats(acc[(m, label)]), len(acc[(m, label)]))
                 for m in methods if (m, label) in acc}
        if not stats:
            continue
        best = max(s[0] for s in stats.values())
        cells = []
        for m in methods:
            if m not in stats:
                cells.append("–")
                continue
            mean, std, n = stats[m]
            cell = f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"
            cells.append(f"**{cell}**" if math.isclose(mean, best, abs_tol=1e-9) else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_choices(rows: list[dict], spec: StudySpec) -> str:
    """Per M, the grid candidate each method chose on validation accuracy (empty without
    grids). Budgets whose candidates are not all trained show what is known so far."""
    grid_methods = [m for m in spec.methods if m.grid]
    if not grid_methods:
        return ""
    lines = ["| M | " + " | ".join(m.name for m in grid_methods) + " |",
             "|---" * (len(grid_methods) + 1) + "|"]
    for b in spec.budgets:
        label, cells = budget_label(b), []
        for m in grid_methods:
            candidates = spec.candidates(m, b)
            keys = [candidate_key(c) for c in candidates]
            chosen, means = choose(rows, m.name, label, keys, spec.seeds)
            others = ", ".join(f"{candidate_label(c)}: {means[k]:.2f}"
                               for c, k in zip(candidates, keys) if k != chosen and k in means)
            if chosen is None:
                cells.append(f"(not all trained; {others})" if others else "–")
            else:
                cells.append(f"**{candidate_label(chosen)}** (val {means[chosen]:.2f}"
                             + (f"; {others})" if others else ")"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def length_note(spec: StudySpec) -> str:
    if spec.epochs is None and isinstance(spec.steps, int):
        return f"{spec.steps} optimizer steps per run."
    parts = []
    for b in spec.budgets:
        unit, n = spec.length(b)
        parts.append(f"{'M=' if b is not None else ''}{budget_label(b)}: {n} {unit}")
    return "Training length: " + ", ".join(parts) + " (steps are optimizer steps)."


def results_markdown(spec: StudySpec, study_hash: str, rows: list[dict],
                     teacher_acc: float | None) -> str:
    seeds = spec.seeds
    what = (f"mean ± std over seeds {seeds}" if len(seeds) > 1
            else f"one seed ({seeds[0]}; n=1, so no std)")
    teacher = f" Teacher: {teacher_acc * 100:.2f}%." if teacher_acc is not None else ""
    text = (f"# Study `{spec.name}` (hash {study_hash})\n\n"
            f"Test accuracy (%) of the student, {what}; best per row in bold. "
            f"{length_note(spec)}{teacher}\n\n")
    text += format_table(rows, [m.name for m in spec.methods], spec.budgets) + "\n"
    counts = [len(v) for v in _test_accuracies(rows).values()]
    if len(seeds) > 1 and 1 in counts:
        text += "\nA cell without ± holds one run so far (n=1).\n"
    choices = format_choices(rows, spec)
    if choices:
        text += ("\nChosen on validation accuracy (%): for each M, every candidate of the grid was "
                 f"trained with every seed and its final weights were measured on the held-out "
                 f"validation split; the candidate with the best mean (bold; the others' means "
                 f"follow) is the one tested and reported above.\n\n{choices}\n")
    failed = failures(rows)
    if failed:
        text += ("\nFailed runs (not in the table; a rerun of the study tries them again):\n\n"
                 + "\n".join(f"- {r['method']} M={r['M']} seed={r['seed']}: {r['error']}"
                              for r in failed) + "\n")
    return text


def failures(rows: list[dict]) -> list[dict]:
    """Failed runs not replaced by a later row of the same run."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        kind = RUN if r["kind"] == FAILED else r["kind"]
        latest[(r["method"], str(r["M"]), str(r["seed"]), kind, r["candidate"])] = r
    return [r for r in latest.values() if r["kind"] == FAILED]


def plot_results(rows: list[dict], spec: StudySpec, path: Path, teacher_acc: float | None) -> None:
    """Test accuracy against M per method (log x axis), bands of ± one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = _test_accuracies(rows)
    numeric = [b for b in spec.budgets if b is not None]
    full_x = (max(numeric) * 2) if numeric else 1
    xs = {budget_label(b): (full_x if b is None else b) for b in spec.budgets}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2])
    for m in spec.methods:
        pts = sorted((x, *_stats(acc[(m.name, label)])) for label, x in xs.items()
                     if (m.name, label) in acc)
        if not pts:
            continue
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
    over = "mean ± std over seeds" if len(spec.seeds) > 1 else "one seed"
    ax.set_title(f"{spec.name}: student accuracy vs data budget ({over})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(spec: StudySpec, study_hash: str, rows: list[dict], output: Path,
                 teacher_acc: float | None) -> str:
    """Write results.md and accuracy_vs_m.png into ``output``; returns the table."""
    output = Path(output)
    (output / "results.md").write_text(results_markdown(spec, study_hash, rows, teacher_acc))
    plot_results(rows, spec, output / "accuracy_vs_m.png",
                 None if teacher_acc is None else 100 * teacher_acc)
    return format_table(rows, [m.name for m in spec.methods], spec.budgets)
