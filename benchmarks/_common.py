"""Helpers the benchmark scripts share: run the kd-lightning CLI, read a run's TensorBoard
scalars, format mean ± std over seeds."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd_args: list[str], env: dict) -> None:
    """``python -m kd_lightning.cli CMD_ARGS`` from the repository; exits with its stderr if it fails."""
    cmd = [sys.executable, "-m", "kd_lightning.cli", *cmd_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def read_scalars(log_dir: Path, tags: list[str]) -> dict[str, float]:
    """Last value of each of ``tags`` in a run's TensorBoard log ({} if there is none)."""
    if not log_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    present = set(acc.Tags()["scalars"])
    return {t: acc.Scalars(t)[-1].value for t in tags if t in present}


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± sample std`` of ``values`` x ``scale`` ("–" for none, ± 0 for one)."""
    if not values:
        return "–"
    m = statistics.fmean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"
