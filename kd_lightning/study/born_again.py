r"""``kd-lightning-born-again``: self-distillation over generations (born-again networks).

Furlanello, Lipton, Tschannen, Itti & Anandkumar, "Born Again Neural Networks", ICML 2018.
Generation 0 learns from the labels alone; generation ``k >= 1``, of the same architecture, is
distilled from generation ``k - 1`` as a frozen teacher. The ensemble of generations ``0..k``
averages their softmax outputs, :math:`p_{ens}(x) = \frac{1}{k+1} \sum_{i=0}^{k} p_i(x)` (the
paper's BAN ensembles)::

    kd-lightning-born-again --config configs/mnist1d/born_again.yaml --generations 3 \
        [--output born_again/mnist1d] [--pure-kd] [any kd-lightning fit argument ...]

The config is a ``kd-lightning fit`` config of a method that distils from a teacher, without the
teacher. Generation 0 trains ``Supervised`` with its student, optimiser and schedule (the
method's own arguments dropped); generation k the config's method with ``teacher`` = the
student's architecture and ``teacher_checkpoint`` = generation k - 1's ``best.ckpt``
(``--pure-kd``: on the soft targets alone, the paper's BAN loss); ``seed_everything`` = the
config's seed + k. Each runs through :func:`kd_lightning.jobs.run_job` with the config written to
``<output>/gen<k>.yaml``, logs and checkpoints in ``<output>/gen<k>/run/``. A rerun skips
finished generations (``gen<k>/result.json``), resumes an interrupted one from its ``last.ckpt``,
and adds generations if ``--generations`` grew. ``results.md`` / ``results.csv``: each
generation's test accuracy and that of the ensemble of generations ``0..k``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import inspect
import io
import json
import pydoc
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from kd_lightning import KDConfigError, jobs

SUPERVISED = "kd_lightning.methods.Supervised"


def _load_config(path: Path) -> dict:
    if not path.is_file():
        raise KDConfigError(f"born-again: config {path} not found.")
    cfg = yaml.safe_load(path.read_text()) or {}
    model = cfg.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise KDConfigError(f"born-again: {path} has no model.class_path; give a kd-lightning fit "
                            f"config of a distillation method, e.g. kd_lightning.methods.ResponseKD.")
    init = model.get("init_args") or {}
    if "student" not in init:
        raise KDConfigError(f"born-again: {path} has no model.init_args.student; every generation "
                            f"trains that architecture.")
    if init.get("teacher") is not None or init.get("teacher_checkpoint") is not None:
        raise KDConfigError(f"born-again: {path} sets model.init_args.teacher/teacher_checkpoint; "
                            f"remove them: generation k's teacher is generation k - 1.")
    return cfg


def generation_config(cfg: dict, k: int, output: Path, pure_kd: bool = False) -> dict:
    """The ``kd-lightning fit`` config of generation ``k`` (see the module docstring)."""
    from kd_lightning.methods import DistillationModule

    gen = copy.deepcopy(cfg)
    model = gen["model"]
    init = dict(model.get("init_args") or {})
    if k == 0:
        base_args = set(inspect.signature(DistillationModule.__init__).parameters) - {"self"}
        init = {key: v for key, v in init.items() if key in base_args}
        model["class_path"] = SUPERVISED
    else:
        cls = pydoc.locate(model["class_path"])
        if cls is None:
            raise KDConfigError(f"born-again: model.class_path {model['class_path']!r} cannot be "
                                f"imported.")
        if not getattr(cls, "requires_teacher", False):
            raise KDConfigError(
                f"born-again: {model['class_path']} does not distil from a teacher network; give "
                f"a method that does (e.g. kd_lightning.methods.ResponseKD) in model.class_path.")
        init["teacher"] = copy.deepcopy(init["student"])
        init["teacher_checkpoint"] = str(checkpoint_dir(output, k - 1) / "best.ckpt")
        if pure_kd:
            init["ce_weight"], init["kd_weight"] = 0.0, 1.0
    model["init_args"] = init
    gen["seed_everything"] = int(cfg.get("seed_everything") or 0) + k
    gen["trainer"] = gen.get("trainer") or {}
    gen["trainer"]["logger"] = {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                                "init_args": {"save_dir": str(output), "name": f"gen{k}",
                                              "version": "run"}}
    return gen


def checkpoint_dir(output: Path, k: int) -> Path:
    return output / f"gen{k}" / "run" / "checkpoints"


def result_file(output: Path, k: int) -> Path:
    return output / f"gen{k}" / "result.json"


def run_generations(config: str | Path, generations: int, output: str | Path,
                    extra: list[str] | None = None, pure_kd: bool = False,
                    overwrite: bool = False, log=print) -> list[dict]:
    """Train generations ``0..generations-1`` (skipping finished ones), then evaluate each and the
    ensembles of generations ``0..k`` on the test split. Returns one row per generation."""
    config, output, extra = Path(config), Path(output).resolve(), list(extra or [])
    if generations < 1:
        raise KDConfigError(f"born-again: --generations must be >= 1, got {generations}.")
    cfg = _load_config(config)
    gen_cfgs = [generation_config(cfg, k, output, pure_kd) for k in range(generations)]
    paths = [output / f"gen{k}.yaml" for k in range(generations)]
    parsed = []
    with tempfile.TemporaryDirectory() as tmp:  # every generation must parse before anything is written
        for k, gen_cfg in enumerate(gen_cfgs):
            path = Path(tmp) / f"gen{k}.yaml"
            path.write_text(yaml.safe_dump(gen_cfg, sort_keys=False))
            parsed.append(jobs.parse_run(str(path), extra, f"born-again generation {k}"))
    identity = hashlib.sha256(json.dumps({"config": config.read_text(), "args": extra,
                                          "pure_kd": pure_kd}).encode()).hexdigest()[:16]
    jobs.claim_output(output, "born_again.json", identity,
                      ("born_again.json", "results.md", "results.csv", "gen*"), overwrite,
                      "born-again run", "generations of another configuration (config file, "
                      "arguments or --pure-kd differ)")
    (output / "born_again.json").write_text(json.dumps({"hash": identity}))
    for path, gen_cfg in zip(paths, gen_cfgs):
        path.write_text(yaml.safe_dump(gen_cfg, sort_keys=False))

    for k in range(generations):
        done = result_file(output, k)
        if done.is_file():
            log(f"generation {k}: finished before ({json.loads(done.read_text())['test_acc']:.4f}), skipped")
            continue
        args = ["fit", "--config", str(paths[k]), *extra]
        last = checkpoint_dir(output, k) / "last.ckpt"
        if last.is_file():
            args += ["--ckpt_path", str(last)]
            log(f"generation {k}: resuming from {last}")
        else:
            log(f"generation {k}: training" + (" (labels only)" if k == 0 else f" from generation {k - 1}"))
        job = jobs.Job(args, output / f"gen{k}" / "run.log", jobs.needs_subprocess(parsed[k]))
        try:
            metrics = jobs.run_job(job).metrics
        except jobs.JobFailed as err:
            raise KDConfigError(f"born-again: generation {k} failed ({err}); see {job.log}. "
                                f"Finished generations are kept; rerun the command to "
                                f"continue.") from None
        best = checkpoint_dir(output, k) / "best.ckpt"
        if not best.is_file() or "test/acc" not in metrics:
            raise KDConfigError(f"born-again: generation {k} wrote no {best} or no test/acc (is "
                                f"validation switched off?); see {job.log}.")
        done.write_text(json.dumps({"test_acc": metrics["test/acc"], "checkpoint": str(best)}))
        log(f"generation {k}: test accuracy {metrics['test/acc']:.4f}")

    rows = evaluate_generations(paths[0], [checkpoint_dir(output, k) / "best.ckpt"
                                           for k in range(generations)], extra)
    for k, row in enumerate(rows):
        row["logged_test_acc"] = json.loads(result_file(output, k).read_text())["test_acc"]
    write_results(rows, output)
    return rows


@torch.no_grad()
def evaluate_generations(gen0_config: Path, checkpoints: list[Path], extra: list[str]) -> list[dict]:
    """Test accuracy of each generation's student and of the ensemble (mean softmax) of
    generations ``0..k``, on the test split of the generation-0 config's data module."""
    from kd_lightning.cli import cli_main

    with jobs.output_to(io.StringIO()):
        cli = cli_main(args=["--config", str(gen0_config), *extra, "--trainer.logger", "false",
                             "--trainer.devices", "1", "--trainer.strategy", "auto",
                             "--trainer.accelerator", "cpu"], run=False)
    student, dm = cli.model.student, cli.datamodule
    dm.setup("test")
    loader = dm.test_dataloader()
    probs = []
    for ckpt in checkpoints:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        student.load_state_dict({k[len("student."):]: v for k, v in state.items()
                                 if k.startswith("student.")})
        student.eval()
        probs.append(torch.cat([student(x).float().softmax(-1) for x, _, _ in loader]))
    y = torch.cat([y for _, y, _ in loader])
    rows = []
    for k, p in enumerate(probs):
        ensemble = torch.stack(probs[:k + 1]).mean(0)
        rows.append({"generation": k, "teacher": "labels" if k == 0 else f"generation {k - 1}",
                     "test_acc": float((p.argmax(-1) == y).float().mean()),
                     "ensemble_test_acc": float((ensemble.argmax(-1) == y).float().mean())})
    return rows


def results_table(rows: list[dict]) -> str:
    head = ["| generation | trained from | test acc. (%) | ensemble of generations 0..k (%) |",
            "|---|---|---|---|"]
    return "\n".join(head + [f"| {r['generation']} | {r['teacher']} | {100 * r['test_acc']:.2f} | "
                             f"{100 * r['ensemble_test_acc']:.2f} |" for r in rows])


def write_results(rows: list[dict], output: Path) -> None:
    (output / "results.md").write_text(results_table(rows) + "\n")
    with open(output / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kd-lightning-born-again",
        description="Born-again networks (Furlanello et al. 2018): generation 0 on the labels, "
                    "generation k distilled from generation k-1 (same architecture); reports "
                    "each generation's test accuracy and that of their ensemble.",
        epilog="Any other argument (e.g. --trainer.max_epochs 50) goes to every generation's "
               "kd-lightning fit.")
    parser.add_argument("--config", required=True, help="kd-lightning fit config of the method, "
                                                         "without a teacher")
    parser.add_argument("--generations", type=int, default=3, help="including generation 0")
    parser.add_argument("--output", help="folder of the generations (default: born_again/<config>)")
    parser.add_argument("--pure-kd", action="store_true",
                        help="generations >= 1 on the soft targets alone (ce_weight 0, kd_weight 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete another configuration's generations in --output")
    args, extra = parser.parse_known_args(argv)
    output = Path(args.output or Path("born_again") / Path(args.config).stem)
    jobs.quiet_lightning()
    try:
        rows = run_generations(args.config, args.generations, output, extra, args.pure_kd,
                               args.overwrite)
    except KDConfigError as err:
        print(f"kd-lightning-born-again: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kd-lightning-born-again: interrupted; rerun the same command to continue.", file=sys.stderr)
        return 130
    print(f"{results_table(rows)}\nwritten: {output / 'results.md'}, {output / 'results.csv'}")
    return 0


def cli() -> None:
    """Console script ``kd-lightning-born-again``."""
    raise SystemExit(main())
