"""``kd-lightning-study``: which distillation method works best at my data budget?

The teacher once, then every method x budget M x seed on M stratified labelled examples, through
the same path as ``kd-lightning fit``; the table in Kong et al. (2020)'s layout (results.md,
results.csv, accuracy_vs_m.png). The study config's format: ``configs/studies/README.md``.

Modules: :mod:`~kd_lightning.study.spec` (the YAML, presets, checks),
:mod:`~kd_lightning.study.runner` (the teacher, then every run, resumably),
:mod:`~kd_lightning.study.executors` (runs one after another or on Ray),
:mod:`~kd_lightning.study.results` (results.csv, the choice of a grid candidate),
:mod:`~kd_lightning.study.report` (results.md, plot), :mod:`~kd_lightning.study.cli` (the
command line), :mod:`~kd_lightning.study.born_again` (self-distillation over generations). Every
training runs through :mod:`kd_lightning.jobs`.
"""

from kd_lightning.study.cli import main
from kd_lightning.study.results import format_table, write_report
from kd_lightning.study.runner import StudyRunner
from kd_lightning.study.spec import MethodSpec, StudySpec, load_study

__all__ = ["main", "format_table", "write_report", "StudyRunner", "MethodSpec", "StudySpec",
           "load_study"]
