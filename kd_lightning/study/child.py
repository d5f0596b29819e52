"""One ``kd-lightning`` run on behalf of the study, in this process or in a subprocess.

:func:`run` trains (or tests) through :func:`kd_lightning.cli.cli_main`, exactly as
``kd-lightning fit ...`` would, and returns the run's final metrics. Multi-process strategies
(DDP) start their other processes by re-running the command that started the first one, so the
study runs such trainings in a subprocess of their own::

    python -m kd_lightning.study.child --metrics M.json [--progress P.jsonl] [--validate] \\
        [--save-weights W.ckpt] -- fit --config ... (the kd-lightning arguments)

Every process of the run executes the same :func:`run`; rank 0 writes the metrics file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from pytorch_lightning.callbacks import Callback

#: where :class:`EpochProgress` reports (set for the duration of a run)
_listener: Callable[[dict], None] | None = None


class EpochProgress(Callback):
    """Reports each finished training epoch (epoch, max_epochs, val_acc) to the study."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if _listener is None or not trainer.is_global_zero:
            return
        val = trainer.callback_metrics.get("val/acc")
        _listener({"epoch": trainer.current_epoch + 1, "max_epochs": trainer.max_epochs,
                   "val_acc": None if val is None else float(val)})


def _study_cli():
    """:class:`kd_lightning.cli.KDLightningCLI` whose argument parser is built once per process.

    Building the parser (every Trainer, model and data argument, for four subcommands) costs
    about a third of a short run's fixed cost; the parser is the same for every run, and parsing
    with it leaves it unchanged, so the runs of a study in one process share it.
    """
    global _StudyCLI
    if _StudyCLI is None:
        from kd_lightning.cli import KDLightningCLI

        class StudyCLI(KDLightningCLI):
            _parsers: dict = {}

            def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs) -> None:
                key = (add_subcommands, repr(main_kwargs), repr(subparser_kwargs))
                if key not in self._parsers:
                    super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
                    self._parsers[key] = (self.parser, getattr(self, "_subcommand_parsers", None),
                                          getattr(self, "_subcommand_method_arguments", None))
                self.parser, subparsers, arguments = self._parsers[key]
                if add_subcommands:
                    self._subcommand_parsers = subparsers
                    self._subcommand_method_arguments = arguments

        _StudyCLI = StudyCLI
    return _StudyCLI


_StudyCLI = None


def run(args: list[str], *, validate: bool = False, save_weights: str | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> dict[str, float]:
    """``kd-lightning ARGS`` in this process; returns its final callback metrics as floats.

    Args:
        args: the ``kd-lightning`` arguments (``fit --config ...`` or ``test ...``).
        validate: after the run, evaluate its final weights on the validation split and add
            ``val/acc`` to the metrics. The study's runs train without validation; this only
            measures the weights the run ends with.
        save_weights: write the final weights there (a Lightning checkpoint without optimizer
            state), for a later ``kd-lightning test --ckpt_path``.
        on_epoch: called after every training epoch with ``{"epoch", "max_epochs", "val_acc"}``
            if the run has an :class:`EpochProgress` callback.
    """
    return _run(args, validate, save_weights, on_epoch)[1]


def _run(args, validate, save_weights, on_epoch):
    from kd_lightning.cli import cli_main

    global _listener
    _listener = on_epoch
    try:
        cli = cli_main(args, cli_class=_study_cli())
    finally:
        _listener = None
    trainer = cli.trainer
    if validate:
        trainer.limit_val_batches = 1.0  # the run trained with limit_val_batches 0
        trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    if save_weights:
        trainer.save_checkpoint(save_weights, weights_only=True)
    return trainer, {k: float(v) for k, v in trainer.callback_metrics.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_lightning.study.child",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", required=True, help="JSON file for the final metrics")
    parser.add_argument("--progress", help="JSON-lines file for per-epoch progress")
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--save-weights")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the kd-lightning arguments")
    opts = parser.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args

    def report(event: dict) -> None:
        with open(opts.progress, "a") as f:
            f.write(json.dumps(event) + "\n")

    trainer, metrics = _run(args, opts.validate, opts.save_weights,
                            report if opts.progress else None)
    if trainer.global_rank == 0:
        Path(opts.metrics).write_text(json.dumps(metrics))


if __name__ == "__main__":  # pragma: no cover
    # run main() of the module proper: the callback, imported by its class path, reports to
    # kd_lightning.study.child._listener, not to this __main__ copy's
    from kd_lightning.study.child import main as module_main

    module_main()
