"""``kd-lightning-study``: which distillation method works best at my data budget? The teacher once,
then every method x budget M x seed on M stratified labelled examples, in Kong et al. (2020)'s table
layout (format: ``configs/studies/README.md``). Every training runs through :mod:`kd_lightning.jobs`
(as do :mod:`kd_lightning.born_again`'s generations).
"""

from kd_lightning.study.cli import main
from kd_lightning.study.results import format_table, write_report
from kd_lightning.study.runner import StudyRunner
from kd_lightning.study.spec import MethodSpec, StudySpec, load_study

__all__ = ["main", "format_table", "write_report", "StudyRunner", "MethodSpec", "StudySpec",
           "load_study"]
