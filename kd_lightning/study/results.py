"""A study's ``results.csv``, the rule that chooses a grid candidate from it, and the report built
from it alone (``results.md``, ``accuracy_vs_m.png``; Kong et al. (2020)'s layout: rows M, columns
methods, test accuracy ``mean ± std`` over seeds, best per row in bold). One row per finished run,
with its study's hash (rows of other versions of the study are ignored) and its ``kind``: ``run``
(trained and tested), ``candidate`` (a grid candidate: measured on the validation split, which
chooses, and tested, which only the chosen one reports), ``chosen`` (the chosen candidate's test
accuracy: the table's row for a grid) or ``failed`` (``error`` says why; a rerun tries it again).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from pathlib import Path

from kd_lightning.environment import summary
from kd_lightning.study.spec import BUDGET_UNITS, PER_CLASS, Budget, StudySpec, budget_label, require

CSV_FIELDS = ("study_hash method M seed test_acc teacher_acc epochs steps wall_time_s run_hash run_dir "
              "finished_at kind candidate val_acc error").split()
RUN, CANDIDATE, CHOSEN, FAILED = "run", "candidate", "chosen", "failed"


class Results:
    """``results.csv``: one row per finished run (rows of other studies' hashes are kept)."""

    def __init__(self, path: Path, study_hash: str) -> None:
        self.path, self.study_hash = path, study_hash

    def _read(self) -> tuple[list[str], list[dict], list[tuple[int, str, dict]]]:
        """The header, the valid rows and the lines left out: ``(line number, "torn" or
        "malformed", what of the row could be read)``. A row is written with one ``write`` and
        ``fsync``, so only a kill during that write leaves a torn last line (no final newline); it
        and any row that does not parse are left out, and their runs count as not done."""
        text = self.path.read_text() if self.path.is_file() else ""
        whole, tail = text[:text.rfind("\n") + 1], text[text.rfind("\n") + 1:]
        reader, rows, damaged = csv.DictReader(io.StringIO(whole, newline="")), [], []
        for r in reader:
            if _valid(r):
                rows.append(r)
            else:
                damaged.append((reader.line_num, "malformed", {k: v for k, v in r.items() if isinstance(k, str)}))
        if tail:
            fields = dict(zip(reader.fieldnames or CSV_FIELDS, next(csv.reader([tail]), [])))
            damaged.append((whole.count("\n") + 1, "torn", fields))
        return list(reader.fieldnames or []), rows, damaged

    def damaged(self, planned: set[tuple], done: set[tuple]) -> list[str]:
        """A line per row that cannot be read (torn by a kill while it was written, or malformed):
        which line, whose run, and whether that run is trained again (``planned``: the study's runs'
        ``(method, M, seed)``; ``done``: :meth:`done`)."""
        lines = []
        for number, what, row in self._read()[2]:
            run = " ".join(f"{k}={row[k]}" if k != "method" else row[k] for k in ("method", "M", "seed")
                           if row.get(k))
            try:
                key = run_key(row)
                fate = ("that run is already recorded by another row" if key in done else "that run is trained "
                        "again" if key[:3] in planned else "it is not a run of this study")
            except (KeyError, ValueError, TypeError):
                fate = "its run, if one of this study, is trained again"
            why = "cut short while it was written, e.g. by a kill" if what == "torn" else "it does not parse"
            lines.append(f"{self.path}: line {number} is {what} ({why}; run: {run or 'unreadable'}); it is left "
                         f"out and {fate}.")
        return lines

    def rows(self) -> list[dict]:
        """This study's rows, in the order they were written (files written before grids existed
        have no kind, candidate, val_acc)."""
        return [{**r, **{k: r.get(k) or "" for k in ("candidate", "val_acc", "error")}, "kind": r.get("kind")
                 or RUN} for r in self._read()[1] if r.get("study_hash") == self.study_hash]

    def done(self) -> set[tuple]:
        return {run_key(r) for r in self.rows() if r["kind"] != FAILED}

    def append(self, row: dict) -> None:
        """Append ``row``, flushed to disk. A new file, one of an older layout or one with a torn
        last line is first rewritten (atomically) with today's columns and its valid rows."""
        fields, old, _ = self._read()
        if fields != CSV_FIELDS or not self.path.read_bytes().endswith(b"\n"):
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="")
                writer.writeheader()
                writer.writerows({k: r.get(k) or "" for k in CSV_FIELDS} for r in old)
            os.replace(tmp, self.path)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="").writerow(row)
            f.flush()
            os.fsync(f.fileno())


def _valid(row: dict) -> bool:
    """A complete row: every column present, seed an integer, accuracies numbers or empty."""
    try:
        int(row["seed"])
        [float(row[k]) for k in ("test_acc", "val_acc", "wall_time_s") if row.get(k)]
    except (KeyError, ValueError, TypeError):
        return False
    return None not in row and None not in row.values() and bool(row.get("study_hash") and row.get("method"))


def run_key(row: dict) -> tuple:
    """Which run a row records: ``(method, M, seed, kind, candidate)``."""
    return row["method"], str(row["M"]), int(row["seed"]), row.get("kind") or RUN, row.get("candidate") or ""


def candidate_key(candidate: dict) -> str:
    return json.dumps(candidate) if candidate else ""


def candidate_label(candidate: dict | str) -> str:
    """``eps=2`` for ``{"model.init_args.eps": 2}`` (full keys where short ones would clash)."""
    if isinstance(candidate, str):
        candidate = json.loads(candidate) if candidate else {}
    short = [k.rsplit(".", 1)[-1] for k in candidate]
    names = short if len(set(short)) == len(short) else list(candidate)
    return ", ".join(f"{n}={v}" for n, v in zip(names, candidate.values()))


def choose(rows: list[dict], method: str, label: str, candidates: list[str],
           seeds: list[int]) -> tuple[str | None, dict[str, float]]:
    """The grid candidate (its key) with the best mean ``val_acc`` over the seeds for ``method``
    at budget ``label`` -- the first in grid order on a tie; None while a candidate lacks a
    seed's run -- and every candidate's mean. Test accuracy is not consulted."""
    val: dict[str, dict[int, float]] = {c: {} for c in candidates}
    for r in rows:
        if (r["method"], str(r["M"]), r["kind"]) == (method, label, CANDIDATE) and r["candidate"] in val:
            val[r["candidate"]][int(r["seed"])] = float(r["val_acc"])
    means = {c: sum(v.values()) / len(v) for c, v in val.items() if v}
    if any(set(seeds) - set(v) for v in val.values()):
        return None, means
    return max(candidates, key=lambda c: means[c]), means


def failures(rows: list[dict]) -> list[dict]:
    """Failed runs not replaced by a later row of the same run."""
    latest = {run_key({**r, "kind": RUN if r["kind"] == FAILED else r["kind"]}): r for r in rows}
    return [r for r in latest.values() if r["kind"] == FAILED]


# ---- the report -----------------------------------------------------------------------------
def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _test_accuracies(rows: list[dict]) -> dict[tuple[str, str], list[float]]:
    """Test accuracies per (method, M): runs and chosen grid candidates (the other candidates'
    test accuracies are recorded but never reported)."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.get("test_acc") not in (None, "") and r["kind"] in (RUN, CHOSEN):
            acc.setdefault((r["method"], str(r["M"])), []).append(float(r["test_acc"]))
    return acc


def _header(names: list[str], unit: str | None = None) -> list[str]:
    """The table's first two lines; the budget column names what M counts when ``unit`` is given
    (``total``: "M (labelled examples)", ``per_class``: "M (per class)")."""
    first = "M" if unit is None else f"M ({BUDGET_UNITS[unit]})"
    return [f"| {first} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]


def format_table(rows: list[dict], methods: list[str], budgets: list[Budget], unit: str | None = None) -> str:
    """Rows M (those with results), columns methods, ``mean ± std`` of test accuracy over seeds
    (the mean alone for one run), best in bold; ``unit`` (a study's ``budget_unit``) names what M
    counts in the header."""
    acc, lines = _test_accuracies(rows), _header(methods, unit)
    for label in map(budget_label, budgets):
        stats = {m: (*_stats(acc[(m, label)]), len(acc[(m, label)])) for m in methods if (m, label) in acc}
        if not stats:
            continue
        best, cells = max(s[0] for s in stats.values()), []
        for mean, std, n in (stats.get(m, (None, 0, 0)) for m in methods):
            cell = "–" if mean is None else f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"
            cells.append(f"**{cell}**" if mean is not None and math.isclose(mean, best, abs_tol=1e-9) else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_choices(rows: list[dict], spec: StudySpec) -> str:
    """Per M, the grid candidate each method chose on validation accuracy (empty without grids);
    budgets whose candidates are not all trained show what is known so far."""
    grid_methods = [m for m in spec.methods if m.grid]
    lines = _header([m.name for m in grid_methods], spec.budget_unit)
    for b in spec.budgets:
        cells = []
        for m in grid_methods:
            keys = [candidate_key(c) for c in spec.candidates(m, b)]
            chosen, means = choose(rows, m.name, budget_label(b), keys, spec.seeds)
            others = ", ".join(f"{candidate_label(k)}: {means[k]:.2f}" for k in keys if k != chosen and k in means)
            cells.append((f"(not all trained; {others})" if others else "–") if chosen is None else
                         f"**{candidate_label(chosen)}** (val {means[chosen]:.2f}"
                         + (f"; {others})" if others else ")"))
        lines.append(f"| {budget_label(b)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if grid_methods else ""


def length_note(spec: StudySpec) -> str:
    if spec.epochs is None and isinstance(spec.steps, int):
        return f"{spec.steps} optimizer steps per run."
    parts = [f"{'M=' if b is not None else ''}{budget_label(b)}: {n} {unit}"
             for b in spec.budgets for unit, n in [spec.length(b)]]
    return "Training length: " + ", ".join(parts) + " (steps are optimizer steps)."


def results_markdown(spec: StudySpec, study_hash: str, rows: list[dict],
                     teacher_acc: float | None, environments: list[dict] | None = None) -> str:
    """results.md: the table, then the environments the runs ran in, one line each (float32 results
    move within the seed spread across CPU kernels and thread counts), the grid choices and the failures."""
    seeds, environments = spec.seeds, environments or []
    what = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"one seed ({seeds[0]}; n=1, so no std)"
    teacher = f" Teacher: {teacher_acc * 100:.2f}%." if teacher_acc is not None else ""
    text = (f"# Study `{spec.name}` (hash {study_hash})\n\nTest accuracy (%) of the student, {what}; best per row "
            f"in bold. {length_note(spec)}{teacher}\n\n"
            + format_table(rows, [m.name for m in spec.methods], spec.budgets, spec.budget_unit) + "\n"
            + "".join(f"\nEnvironment{f' {i + 1}' if len(environments) > 1 else ''}: {summary(env)}.\n"
                      for i, env in enumerate(environments)))
    if len(seeds) > 1 and 1 in [len(v) for v in _test_accuracies(rows).values()]:
        text += "\nA cell without ± holds one run so far (n=1).\n"
    choices = format_choices(rows, spec)
    if choices:
        text += ("\nChosen on validation accuracy (%): for each M, every candidate of the grid was trained with "
                 f"every seed and its final weights were measured on the held-out validation split; the candidate "
                 f"with the best mean (bold; the others' means follow) is the one reported above. Every candidate "
                 f"is also tested when it finishes (results.csv keeps it), but no test accuracy takes part in the "
                 f"choice."
                 f"\n\n{choices}\n")
    failed = "".join(f"- {r['method']} M={r['M']} seed={r['seed']}: {r['error']}\n" for r in failures(rows))
    return text + (f"\nFailed runs (not in the table; a rerun of the study tries them again):\n\n{failed}"
                   if failed else "")


def plot_results(rows: list[dict], spec: StudySpec, path: Path, teacher_acc: float | None) -> None:
    """Test accuracy against M per method (log x axis), bands of ± one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc = _test_accuracies(rows)
    numeric = [b for b in spec.budgets if b is not None]
    xs = {budget_label(b): (max(numeric, default=0.5) * 2 if b is None else b) for b in spec.budgets}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2])
    for m in spec.methods:
        pts = sorted((x, *_stats(acc[(m.name, label)])) for label, x in xs.items() if (m.name, label) in acc)
        if pts:
            x, mean, std = map(np.array, zip(*pts))
            line, = ax.plot(x, mean, label=m.name, **(dict(linestyle="--", color="black", marker="s")
                                                       if m.reference else {"marker": "o"}))
            ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())
    if teacher_acc is not None:
        ax.axhline(teacher_acc, color="firebrick", linestyle=":", linewidth=2, label=f"teacher ({teacher_acc:.1f}%)")
        ax.set_ylim(ax.get_ylim()[0], max(ax.get_ylim()[1], teacher_acc + 2))
    ax.set_xscale("log")
    ax.set_xticks(list(xs.values()), list(xs.keys()))
    ax.set(xlabel="labelled training examples per class M" if spec.budget_unit == PER_CLASS
           else "labelled training examples M", ylabel="test accuracy (%)",
           title=f"{spec.name}: student accuracy vs data budget "
                 f"({'mean ± std over seeds' if len(spec.seeds) > 1 else 'one seed'})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(spec: StudySpec, study_hash: str, rows: list[dict], output: Path,
                 teacher_acc: float | None, environments: list[dict] | None = None) -> str:
    """Write results.md and accuracy_vs_m.png into ``output``; returns the table."""
    output = Path(output)
    (output / "results.md").write_text(results_markdown(spec, study_hash, rows, teacher_acc, environments))
    plot_results(rows, spec, output / "accuracy_vs_m.png", None if teacher_acc is None else 100 * teacher_acc)
    return format_table(rows, [m.name for m in spec.methods], spec.budgets, spec.budget_unit)


def report_only(spec: StudySpec, output: Path) -> str:
    """``--report-only``: rebuild results.md and the plot of a study's folder from results.csv."""
    meta = output / "study.json"
    require(meta.is_file(), f"--report-only: {output} holds no study results (no study.json); run the "
            f"study first, or give its folder with --output.")
    info = json.loads(meta.read_text())
    require(info.get("hash") == spec.hash(), f"--report-only: {output} holds the results of a different "
            f"study (hash {info.get('hash')}) than {spec.path} describes (hash {spec.hash()}); give the "
            f"study config and --preset that wrote them.")
    return write_report(spec, spec.hash(), Results(output / "results.csv", spec.hash()).rows(),
                        output, (info.get("teacher") or {}).get("test_acc"),
                        info.get("run_environments") or ([info["environment"]] if "environment" in info else []))
