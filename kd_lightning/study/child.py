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
import re
from pathlib import Path
from typing import Any, Callable

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


class ParseCache:
    """Parses each method's configuration once per process instead of once per run.

    The runs of a study differ from each other in a few scalar arguments (seed, budget, epochs,
    log folder name, epoch-scaled schedule lengths); checking a whole configuration (every
    ``class_path`` and its arguments) is most of the parsing time. So a command line is parsed in
    full once per *layout* (the same tokens, except the values of ``--name value`` pairs), and
    a later command line of that layout reuses a checked configuration with only its differing
    values replaced. A value is replaced only where the result is certain to equal a
    full parse: the key holds a plain ``int``, ``float`` or ``str`` there, and the new text reads
    as that type the way the parser reads it (an integer for an ``int``, a number for a
    ``float``; for a ``str``, text that is not null, a boolean, a number or YAML syntax).
    Any other difference (``--config``, a class, a list, a null, ``+=``) is parsed in full.
    """

    _INT = re.compile(r"[-+]?\d+")
    _SPECIAL = {"null", "none", "true", "false", "yes", "no", "on", "off", "~", ""}
    _YAML = re.compile(r"[:{}\[\],#&*!|>'\"%@`]|^\s|\s$")
    #: full parses kept per layout (e.g. one with a budget and one with the full split)
    ENTRIES = 4

    def __init__(self) -> None:
        self._entries: dict[tuple, list[tuple[list[str], Any]]] = {}
        #: parses done in full / from the cache (for tests and benchmarks)
        self.full = self.reused = 0

    @staticmethod
    def _layout(args: list[str]) -> tuple:
        layout = list(args)
        for i in range(1, len(args)):
            if ParseCache._value_flag(args[i - 1]) and not args[i].startswith("--"):
                layout[i] = None
        return tuple(layout)

    @staticmethod
    def _value_flag(token: str) -> bool:
        return token.startswith("--") and "=" not in token and token not in ("--config", "--ckpt_path")

    @classmethod
    def _read(cls, text: str, old: Any) -> Any:
        """``text`` read as the parser reads it where it read ``old``; ``cls`` if unsure."""
        if type(old) is int:
            return int(text) if cls._INT.fullmatch(text) else cls
        if type(old) is float:
            try:
                value = float(text)
            except ValueError:
                return cls
            return value if value == value and abs(value) != float("inf") else cls
        if type(old) is str:
            try:
                float(text)
                return cls
            except ValueError:
                pass
            special = text.lower() in cls._SPECIAL or cls._YAML.search(text)
            return cls if special else text
        return cls

    def parse(self, parser, args: list[str]):
        """The parsed configuration of ``args`` (a command line with a subcommand first)."""
        args = [str(a) for a in args]
        entries = self._entries.setdefault((id(parser), self._layout(args)), [])
        for base_args, base in entries:
            config = self._replaced(base_args, base, args)
            if config is not None:
                self.reused += 1
                return config
        config = parser.parse_args(args)
        self.full += 1
        if len(entries) < self.ENTRIES:
            entries.append((args, config.clone()))
        return config

    def _replaced(self, base_args: list[str], base, args: list[str]):
        """``base`` with the values in which ``args`` differ from ``base_args``, or ``None``."""
        if args[0] != base_args[0]:
            return None
        config = base.clone()
        for i, (was, now) in enumerate(zip(base_args, args)):
            if was == now:
                continue
            name = f"{args[0]}.{args[i - 1][2:]}"
            old = base.get(name, self)
            value = self._read(now, old)
            if old is self or value is ParseCache:
                return None
            config[name] = value
        return config


#: the parse cache of this process's study runs
parse_cache = ParseCache()


def _study_cli():
    """:class:`kd_lightning.cli.KDLightningCLI` whose argument parser is built once per process,
    and whose runs parse each configuration once (:class:`ParseCache`).

    Building the parser (every Trainer, model and data argument, for four subcommands) costs
    about a third of a short run's fixed cost; the parser is the same for every run, and parsing
    with it leaves it unchanged, so the runs of a study in one process share it.
    """
    global _StudyCLI
    if _StudyCLI is None:
        from kd_lightning.cli import KDLightningCLI

        class StudyCLI(KDLightningCLI):
            _parsers: dict = {}

            def parse_arguments(self, parser, args) -> None:
                if not isinstance(args, list):
                    return super().parse_arguments(parser, args)
                self.config = parse_cache.parse(parser, args)

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
