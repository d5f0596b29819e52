"""``kd-lightning-study``: the command line of the few-data study (see :mod:`kd_lightning.study`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd_lightning import KDConfigError, jobs
from kd_lightning.study.results import failures, report_only, write_report
from kd_lightning.study.runner import StudyRunner
from kd_lightning.study.spec import load_study, require


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-lightning-study",
        allow_abbrev=False,  # a misspelt option is an error, never taken for a longer one
        description="Which distillation method works best at my data budget? Trains the teacher once, then every "
                    "method of the study config for every budget M and seed, and writes the table (results.md, "
                    "results.csv) and a plot.",
        epilog="Any --trainer.* flag (e.g. --trainer.precision bf16-mixed), in either form, is passed to every run.")
    add = parser.add_argument
    add("--config", required=True, help="study config (YAML)")
    add("--preset", help="a preset of the study config, e.g. quick")
    add("--output", help="results folder (default: from the config)")
    add("--overwrite", action="store_true", help="replace a different study's results in --output")
    add("--teacher-cache", help="where trained teachers are kept (default: <output>/../_teachers)")
    add("--seeds", type=int, nargs="+",
        help="run these seeds only (the same study: runs given different seeds can share one output folder)")
    add("--stop-on-failure", action="store_true",
        help="stop at the first failed run (default: record it as failed and go on)")
    add("--report-only", action="store_true", help="rebuild results.md and the plot; train nothing")
    add("--no-progress", action="store_true", help="no progress bars, a line per finished run")
    add("--resume-every", type=float, default=60.0, metavar="SECONDS",
        help="a run's resume checkpoint is rewritten at an epoch's end once SECONDS have passed since the last "
             "(0: every epoch); a rerun continues a run killed part-way from it (default: 60)")
    ray = parser.add_argument_group(
        "parallel runs on Ray (pip install kd_lightning[ray])",
        "Each run is a Ray task; results.csv is written by this process alone.").add_argument
    ray("--workers", type=int, metavar="N", help="run on a local Ray instance with N CPUs")
    ray("--address", help="run on the Ray cluster at ADDR (auto, or HEAD_IP:6379); the output folder and teacher "
                          "cache must be on a file system every node sees")
    ray("--cpus-per-run", type=float, default=1.0, metavar="C", help="CPUs (threads) of each run")
    ray("--gpus-per-run", type=float, default=0.0, metavar="G", help="GPUs of each run; a fraction (e.g. 0.25) "
                                                                     "lets runs share a GPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``kd-lightning-study ARGV``; returns the exit code (0 done, 1 a run failed, 2 bad input,
    130 interrupted)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("--") and not a.startswith("--trainer.")]
    if bad:
        parser.error(f"unknown arguments {bad}: only --trainer.* flags are passed to the runs")
    output, failed = None, []
    try:
        spec = load_study(args.config, args.preset, run_args=rest)
        spec.seeds = list(dict.fromkeys(args.seeds or spec.seeds))
        output = Path(args.output or spec.output)
        if args.report_only:
            table = report_only(spec, output)
        else:
            executor = None
            if args.workers is not None or args.address is not None:
                from kd_lightning.study.executors import RayExecutor

                executor = RayExecutor(args.workers, args.address, args.cpus_per_run, args.gpus_per_run)
            require((args.cpus_per_run, args.gpus_per_run) == (1.0, 0.0) or executor, "--cpus-per-run and "
                    "--gpus-per-run declare the resources of Ray tasks; give them with --workers N or --address ADDR.")
            runner = StudyRunner(spec, output, rest, args.overwrite,
                                 Path(args.teacher_cache or output.parent / "_teachers"),
                                 not args.no_progress, not args.stop_on_failure, executor, args.resume_every)
            jobs.quiet_lightning()
            runner.run()
            rows = runner.results.rows()
            table = write_report(spec, runner.study_hash, rows, output, runner.teacher_acc, runner.environments)
            failed = failures(rows)
    except (KDConfigError, jobs.JobFailed) as err:
        print(f"kd-lightning-study: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, KDConfigError) else 1
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM reaching a run (JobInterrupted)
        where = f" in {output / 'results.csv'}" if output else ""
        print(f"\nkd-lightning-study: interrupted; finished runs are kept{where}. Rerun the same command to continue.",
              file=sys.stderr)
        return getattr(err, "exit_code", 130)
    print(f"\n{table}")
    if failed:
        print(f"\n{len(failed)} run(s) failed and are not in the table (listed in {output / 'results.md'}); "
              f"rerun the same command to try them again.", file=sys.stderr)
    made = "" if args.report_only else f", {output / 'results.csv'} and TensorBoard runs in {output / 'runs'}"
    print(f"\nwrote {output / 'results.md'}, {output / 'accuracy_vs_m.png'}{made}")
    return 1 if failed else 0


def cli() -> None:
    """Console script ``kd-lightning-study``."""
    raise SystemExit(main())
