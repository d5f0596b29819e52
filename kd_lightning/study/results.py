"""``results.csv`` of a study, and the rule that chooses a grid candidate from it.

One row per finished run, appended and flushed to disk as the run ends; a study's rows carry its
hash, so a folder's file can hold the rows of an earlier version of the study, which are ignored.
Rows have a ``kind``: ``run`` (trained and tested), ``candidate`` (a grid candidate: trained and
measured on the validation split, not tested), ``chosen`` (the test of the chosen candidate's
weights) or ``failed`` (a run that failed, e.g. diverged; its ``error`` says why). A failed run
has no accuracy, is not done (a rerun tries it again) and is listed in the report.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

CSV_FIELDS = ["study_hash", "method", "M", "seed", "test_acc", "teacher_acc", "epochs", "steps",
              "wall_time_s", "run_hash", "run_dir", "finished_at", "kind", "candidate", "val_acc",
              "error"]
#: kinds of rows: a run trained and tested; a grid candidate trained and validated; the test of
#: the chosen candidate's weights
RUN, CANDIDATE, CHOSEN, FAILED = "run", "candidate", "chosen", "failed"


class Results:
    """``results.csv``: one row per finished run (rows of other studies' hashes are kept)."""

    def __init__(self, path: Path, study_hash: str) -> None:
        self.path, self.study_hash = path, study_hash

    def _read(self) -> tuple[list[str], list[dict]]:
        """The header and the valid rows. A row is written with one ``write`` and ``fsync``, so
        only a kill in the middle of that write leaves a torn last line (no final newline); it
        and any row that does not parse are left out, and their runs count as not done."""
        if not self.path.is_file():
            return [], []
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return list(reader.fieldnames or []), [r for r in reader if _valid(r)]

    def rows(self) -> list[dict]:
        """This study's rows, in the order they were written."""
        rows = [r for r in self._read()[1] if r.get("study_hash") == self.study_hash]
        for r in rows:  # files written before grids existed have no kind/candidate/val_acc
            r["kind"] = r.get("kind") or RUN
            r["candidate"] = r.get("candidate") or ""
            r["val_acc"] = r.get("val_acc") or ""
            r["error"] = r.get("error") or ""
        return rows

    def done(self) -> set[tuple]:
        return {self.key(r["method"], r["M"], r["seed"], r["kind"], r["candidate"])
                for r in self.rows() if r["kind"] != FAILED}

    @staticmethod
    def key(method: str, label: str, seed: Any, kind: str, candidate: str) -> tuple:
        return method, str(label), int(seed), kind, candidate

    def append(self, row: dict) -> None:
        if self.path.is_file():  # a torn last line is cut, so the row starts on a line of its own
            with open(self.path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        fields, old = self._read()
        if fields and fields != CSV_FIELDS:  # an older file: rewrite it with today's columns
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="")
                writer.writeheader()
                writer.writerows({k: r.get(k) or "" for k in CSV_FIELDS} for r in old)
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())


def _valid(row: dict) -> bool:
    """A complete row: every column present, seed an integer, accuracies numbers or empty."""
    if None in row or any(v is None for v in row.values()):
        return False  # too many or too few fields
    try:
        int(row["seed"])
        for key in ("test_acc", "val_acc", "wall_time_s"):
            if row.get(key):
                float(row[key])
    except (KeyError, ValueError):
        return False
    return bool(row.get("study_hash")) and bool(row.get("method"))


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
    """The grid candidate chosen for ``method`` at budget ``label``, by validation accuracy.

    Returns the candidate (its key in results.csv) with the highest mean ``val_acc`` over the
    seeds -- the first in grid order on a tie -- and every candidate's mean. The candidate is
    None while some candidate still lacks a seed's run. Test accuracy is not consulted.
    """
    val: dict[str, dict[int, float]] = {c: {} for c in candidates}
    for r in rows:
        if (r["method"], str(r["M"]), r["kind"]) == (method, label, CANDIDATE) \
                and r["candidate"] in val:
            val[r["candidate"]][int(r["seed"])] = float(r["val_acc"])
    means = {c: sum(v.values()) / len(v) for c, v in val.items() if v}
    if any(set(seeds) - set(v) for v in val.values()):
        return None, means
    return max(candidates, key=lambda c: means[c]), means
