"""benchmarks/validation_curves.py: a validating study's curves, read from its runs' TensorBoard logs."""

from __future__ import annotations

import csv
import importlib.util
import shutil
import subprocess
import sys

import pytest
from torch.utils.tensorboard import SummaryWriter

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "validation_curves.py"


@pytest.fixture(scope="module")
def curves_mod():
    spec = importlib.util.spec_from_file_location("validation_curves", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _log(folder, version: int, values: list[float]) -> None:
    with SummaryWriter(str(folder / f"version_{version}")) as w:
        for step, v in enumerate(values):
            w.add_scalar("val/acc", v, step)


def _study(tmp_path):
    """Two seeds of one method (seed 1 interrupted once: its version_0 is a partial curve), a
    grid candidate that was not chosen (not read) and one that was."""
    rows = []
    for seed, values in ((0, [0.5, 0.6, 0.7, 0.75, 0.76, 0.76, 0.77, 0.77]),
                         (1, [0.4, 0.6, 0.72, 0.77, 0.78, 0.78, 0.79, 0.79])):
        run = tmp_path / "runs" / "KD" / "M500" / f"seed{seed}"
        if seed == 1:
            _log(run, 0, [0.1, 0.2])  # the interrupted attempt
        _log(run, int(seed == 1), values)
        rows.append({"method": "KD", "M": "500", "seed": seed, "kind": "run", "epochs": 8, "run_dir": str(run),
                     "candidate": ""})
    other = tmp_path / "runs" / "W" / "M500" / "seed0" / "eps=1"
    _log(other, 0, [0.1] * 8)
    rows.append({"method": "W", "M": "500", "seed": 0, "kind": "candidate", "epochs": 8, "run_dir": str(other),
                 "candidate": "eps=1"})
    chosen = tmp_path / "runs" / "W" / "M500" / "seed0" / "eps=2"
    _log(chosen, 0, [0.3] * 8 + [0.35])  # eight epochs, then the final measurement on the whole split
    for kind in ("candidate", "chosen"):
        rows.append({"method": "W", "M": "500", "seed": 0, "kind": kind, "epochs": 8, "run_dir": str(chosen),
                     "candidate": "eps=2"})
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_curves_of_the_tested_runs_from_their_last_version(tmp_path, curves_mod):
    _study(tmp_path)
    runs = curves_mod.study_curves(tmp_path)
    assert list(runs) == [("KD", "500", 0, ""), ("KD", "500", 1, ""), ("W", "500", 0, "eps=2")]  # not eps=1
    found = curves_mod.by_budget(runs)
    assert found[("W", "500")] == [[pytest.approx(30.0)] * 8]  # the final measurement is not an epoch
    (seed0, seed1) = found[("KD", "500")]
    assert len(seed1) == 8 and seed1[0] == pytest.approx(40.0)  # version_1, not the partial version_0
    at, best, rise = curves_mod.summary(found[("KD", "500")])
    # mean curve: 45, 60, 71, 76, 77, 77, 78, 78; quarters of 8 epochs: epochs 2, 4, 6, 8
    assert at == pytest.approx([60.0, 76.0, 77.0, 78.0], abs=1e-4)
    assert best == 7 and rise == pytest.approx(1.0, abs=1e-4)


def test_the_script_prints_the_table_and_refuses_a_silent_study(tmp_path):
    _study(tmp_path)
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=True)
    assert "| 500 | KD | 2 | 8 | 60.00 | 76.00 | 77.00 | 78.00 | 7 | +1.00 |" in out.stdout
    silent = tmp_path / "silent"
    silent.mkdir()
    (silent / "results.csv").write_text("method,M,seed,kind,epochs,run_dir\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(silent)], capture_output=True, text=True)
    assert proc.returncode != 0 and "limit_val_batches" in proc.stderr


def test_a_run_resumed_from_its_checkpoint_reads_as_one_curve(tmp_path, curves_mod):
    """Killed after its fourth validation with its last checkpoint at the third, the run resumed
    into the same version folder (a second events file) and validated the fourth epoch again:
    the curve has each epoch once, the resumed attempt's value where both logged it."""

    run = tmp_path / "run"
    with SummaryWriter(str(run / "version_0"), filename_suffix=".first") as w:
        for step, v in enumerate([0.1, 0.2, 0.3, 0.35]):
            w.add_scalar("val/acc", v, step, walltime=1000.0 + step)
    with SummaryWriter(str(run / "version_0"), filename_suffix=".second") as w:
        for step, v in [(3, 0.4), (4, 0.5), (5, 0.6)]:
            w.add_scalar("val/acc", v, step, walltime=2000.0 + step)
    assert len(list((run / "version_0").iterdir())) == 2
    assert curves_mod.curve(run) == pytest.approx([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])


def test_a_study_folder_keeps_its_curves_once_the_logs_are_gone(tmp_path, curves_mod):
    """--save writes FOLDER/curves.csv with every trained run (candidates too); with the
    TensorBoard logs gone the same table comes from results.csv and curves.csv alone, and a later
    session's --save adds its runs to the file and keeps the earlier ones."""
    _study(tmp_path)
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--save"], capture_output=True, text=True,
                         check=True).stdout
    saved = curves_mod.read_saved(tmp_path / "curves.csv")
    assert set(saved) == {("KD", "500", 0, ""), ("KD", "500", 1, ""), ("W", "500", 0, "eps=1"),
                          ("W", "500", 0, "eps=2")}
    assert saved[("W", "500", 0, "eps=1")] == pytest.approx([10.0] * 8, abs=1e-4)
    shutil.rmtree(tmp_path / "runs")
    back = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          check=True).stdout
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 4 and table == [line for line in back.splitlines() if line.startswith("|")]
    # a later session: one more run in results.csv and in the logs; the file keeps the others
    later = tmp_path / "runs" / "KD" / "M1000" / "seed0"
    _log(later, 0, [0.5, 0.6])
    with open(tmp_path / "results.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=["method", "M", "seed", "kind", "epochs", "run_dir", "candidate"]).writerow(
            {"method": "KD", "M": "1000", "seed": 0, "kind": "run", "epochs": 2, "run_dir": str(later),
             "candidate": ""})
    curves_mod.save(tmp_path)
    again = curves_mod.read_saved(tmp_path / "curves.csv")
    assert set(again) == set(saved) | {("KD", "1000", 0, "")}
    assert again[("KD", "1000", 0, "")] == pytest.approx([50.0, 60.0], abs=1e-4)
    assert all(again[k] == pytest.approx(v) for k, v in saved.items())
