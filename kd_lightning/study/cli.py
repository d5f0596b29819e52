"""``kd-lightning-study``: the command line of the few-data study (see :mod:`kd_lightning.study`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd_lightning import KDConfigError, jobs
from kd_lightning.study.results import failures, report_only, write_report
from kd_lightning.study.runner import RunFailed, StudyRunner
from kd_lightning.study.spec import load_study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-lightning-study",
        description="Which distillation method works best at my data budget? Trains the teacher "
                    "once, then every method of the study config for every budget M and seed, "
                    "and writes the table (results.md, results.csv) and a plot.",
        epilog="Any --trainer.* flag (e.g. --trainer.devices 2 --trainer.strategy ddp, "
               "--trainer.precision bf16-mixed) is passed to every run, in either form "
               "(--trainer.x v or --trainer.x=v).")
    parser.add_argument("--config", required=True, help="study config (YAML)")
    parser.add_argument("--preset", default=None, help="a preset of the study config, e.g. quick")
    parser.add_argument("--output", default=None, help="results folder (default: from the config)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an output folder that holds a different study's results")
    parser.add_argument("--teacher-cache", default=None,
                        help="where trained teachers are kept (default: <output>/../_teachers)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run these seeds only (default: the config's); the results belong to "
                             "the same study, so processes or machines given different seeds can "
                             "share one output folder")
    ray = parser.add_argument_group(
        "parallel runs on Ray (pip install kd_lightning[ray])",
        "Each run is a Ray task; the teacher is trained first, results.csv is written by this "
        "process alone. Without --workers/--address the runs go one after another here.")
    ray.add_argument("--workers", type=int, default=None, metavar="N",
                     help="start a local Ray instance with N CPUs and run the study on it")
    ray.add_argument("--address", default=None,
                     help="join the Ray cluster at ADDR (e.g. auto, or HEAD_IP:6379 of `ray start "
                          "--head`); the output folder and teacher cache must be on a file system "
                          "every node sees")
    ray.add_argument("--cpus-per-run", type=float, default=1.0, metavar="C",
                     help="CPUs of each run (its torch/OpenMP threads; default 1)")
    ray.add_argument("--gpus-per-run", type=float, default=0.0, metavar="G",
                     help="GPUs of each run; a fraction (e.g. 0.25) lets runs share a GPU "
                          "(default 0)")
    parser.add_argument("--stop-on-failure", action="store_true",
                        help="stop the study at the first failed run (default: record it as failed, "
                             "leave it out of the table, and go on; a rerun tries it again)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild results.md and the plot from results.csv; train nothing")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (a line per finished run is still printed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``kd-lightning-study ARGV``; returns the exit code (0 done, 1 a run failed, 2 bad
    input, 130 interrupted)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("--") and not a.startswith("--trainer.")]
    if bad:
        parser.error(f"unknown arguments {bad}: only --trainer.* flags are passed to the runs")
    output, failed = None, []
    try:
        spec = load_study(args.config, args.preset, run_args=rest)
        if args.seeds is not None:
            spec.seeds = list(dict.fromkeys(args.seeds))
        output = Path(args.output or spec.output)
        if args.report_only:
            table = report_only(spec, output)
        else:
            cache = Path(args.teacher_cache) if args.teacher_cache else output.parent / "_teachers"
            executor = None
            if args.workers is not None or args.address is not None:
                from kd_lightning.study.executors import RayExecutor

                executor = RayExecutor(args.workers, args.address, args.cpus_per_run,
                                       args.gpus_per_run)
            elif (args.cpus_per_run, args.gpus_per_run) != (1.0, 0.0):
                raise KDConfigError("--cpus-per-run and --gpus-per-run declare the resources of "
                                    "Ray tasks; give them with --workers N or --address ADDR.")
            runner = StudyRunner(spec, output, rest, args.overwrite, cache,
                                 progress=not args.no_progress,
                                 keep_going=not args.stop_on_failure, executor=executor)
            jobs.quiet_lightning()
            runner.run()
            table = write_report(spec, runner.study_hash, runner.results.rows(), output,
                                 runner.teacher_acc)
            failed = failures(runner.results.rows())
    except KDConfigError as err:
        print(f"kd-lightning-study: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"kd-lightning-study: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM reaching a run (JobInterrupted)
        where = f" in {output / 'results.csv'}" if output else ""
        print(f"\nkd-lightning-study: interrupted; finished runs are kept{where}. Rerun the same "
              f"command to continue.", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    print()
    print(table)
    if not args.report_only and failed:
        print(f"\n{len(failed)} run(s) failed and are not in the table (listed in "
              f"{output / 'results.md'}); rerun the same command to try them again.",
              file=sys.stderr)
    if args.report_only:
        print(f"\nwrote {output / 'results.md'} and {output / 'accuracy_vs_m.png'} from "
              f"{output / 'results.csv'}")
    else:
        print(f"\nwrote {output / 'results.md'}, {output / 'results.csv'}, "
              f"{output / 'accuracy_vs_m.png'} and TensorBoard runs in {output / 'runs'}")
    return 1 if not args.report_only and failed else 0


def cli() -> None:
    """Console script ``kd-lightning-study``."""
    raise SystemExit(main())
