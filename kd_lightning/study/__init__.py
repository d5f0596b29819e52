"""``kd-lightning-study``: which distillation method works best at my data budget?

Trains the teacher once (cached by its configuration), then for every method of the study
config, every budget ``M`` and every seed trains the student on a stratified subset of M
labelled examples through the same Lightning path as ``kd-lightning fit``, and tests it (final
weights). Prints the table in the layout of Kong et al. (2020) (rows M, columns methods,
mean ± std over seeds, best per row in bold) and writes ``results.md``, ``results.csv`` (one row
per run) and ``accuracy_vs_m.png`` into the output folder, with every run's TensorBoard logs
beside them. Each run's row is written as soon as it finishes, so rerunning the same command
after an interruption skips the runs already done. ``--report-only`` rebuilds results.md and the
plot from results.csv without training.

Study config (YAML)::

    name: mnist1d
    output: studies/mnist1d                # results folder (--output overrides it)
    teacher: {config: configs/mnist1d/teacher.yaml, args: []}
    budgets: [50, 100, 500, 1000, full]    # M; `full` = the whole training split
    seeds: [0, 1, 2]
    steps: 3000                            # optimizer steps per student run, whatever M is
    epoch_args:                            # run arguments set to (fraction x the run's epochs)
      model.init_args.lr_scheduler.init_args.T_max: 1.0
    args: []                               # kd-lightning arguments for every student run
    methods:
      - {name: student alone, config: configs/mnist1d/student_cnn.yaml, reference: true}
      - name: KD                           # the column's title
        config: configs/mnist1d/response.yaml   # a kd-lightning fit config
        method: ResponseKD                 # optional: checked against the config's model
        args: [--model.init_args.temperature=2]  # command-line arguments, any form the CLI takes
    presets:                               # --preset quick replaces these top-level keys
      quick: {budgets: [50, 100, 500, full], seeds: [0, 1], steps: 500}

Settings per budget. ``steps``, ``epochs`` and every value under ``set`` or ``grid`` may be a
mapping from budgets to values, ``{50: 500, 100: 1000, full: 3000}``; a ``default`` entry serves
the budgets not named (``{full: 0.3, default: 2.0}``). Every budget of the study needs a value::

    steps: {50: 500, default: 1500}        # optimizer steps per run, per M
    epochs: {full: 60}                     # epochs instead of steps where named (here full data)
    set:                                   # run arguments by dotted name, for every method whose
      data.batch_size: {50: 50, default: 100}   # configuration has the argument
    methods:
      - name: WassersteinKD
        config: configs/mnist1d/wasserstein.yaml
        set: {model.init_args.eps: {full: 0.3, default: 2.0}}

A run's length comes from ``epochs`` or ``steps``, whichever names its budget; otherwise from the
one with a plain value (or ``default``); a step count becomes ``round(steps / steps per epoch)``
epochs, so every run ends on an epoch boundary. ``set`` keys are the dotted names of
``kd-lightning fit`` arguments (as in ``--data.batch_size``); the study's own settings
(``data.train_subset``, ``data.subset_seed``, ``seed_everything``, ``trainer.max_epochs``, ...) are
refused there.

Selection on validation. A method's ``grid`` gives candidate values (lists, per budget if wished)::

      - name: WassersteinKD
        config: configs/mnist1d/wasserstein.yaml
        grid: {model.init_args.eps: [0.3, 1, 2]}   # several keys: every combination

For each M, every candidate is trained with every seed, without testing; the final weights of
each run are measured on the data module's validation split (``data.val_split``, held out of
the training set and never part of the M examples). The candidate with the best mean
validation accuracy over the seeds (the first listed on a tie) is chosen, and only its weights
are tested: the table reports its test accuracy, and results.md lists the choice per M with
every candidate's validation mean. A grid of k candidates costs k x seeds runs per M. The
weights of chosen candidates are kept (``runs/.../final.ckpt``), the others deleted.

Modules: :mod:`~kd_lightning.study.spec` (the YAML, presets, checks; each method's config parsed
once), :mod:`~kd_lightning.study.runner` (the teacher, then every run, resumably),
:mod:`~kd_lightning.study.child` (one run, in this process or as ``python -m``),
:mod:`~kd_lightning.study.parallel` (the runs as Ray tasks: ``--workers N``, ``--address``),
:mod:`~kd_lightning.study.results` (results.csv and the choice of a grid candidate),
:mod:`~kd_lightning.study.report` (results.md, plot), :mod:`~kd_lightning.study.cli` (the
command line).
"""

from kd_lightning.study.cli import main
from kd_lightning.study.report import format_table, write_report
from kd_lightning.study.runner import StudyRunner
from kd_lightning.study.spec import MethodSpec, StudySpec, load_study

__all__ = ["main", "format_table", "write_report", "StudyRunner", "MethodSpec", "StudySpec",
           "load_study"]
