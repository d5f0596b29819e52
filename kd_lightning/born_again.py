r"""``kd-lightning-born-again``: self-distillation over generations (born-again networks).

Furlanello, Lipton, Tschannen, Itti & Anandkumar, "Born Again Neural Networks", ICML 2018.
Generation 0 learns from the labels alone (``Supervised`` with the config's student, optimiser
and schedule); generation ``k >= 1`` is the config's method with generation ``k - 1``'s
``best.ckpt`` as its frozen teacher of the same architecture (``--pure-kd``: the soft targets
alone, the paper's BAN loss) and ``seed_everything`` + k. The ensemble of generations ``0..k``
averages their softmax outputs, :math:`p_{ens}(x) = \frac{1}{k+1} \sum_{i=0}^{k} p_i(x)` (the
paper's BAN ensembles). A rerun skips finished generations (``gen<k>/result.json``) and resumes
an interrupted one from its ``last.ckpt``. Usage: ``docs/teachers.md``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import inspect
import json
import pydoc
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from kd_lightning import KDConfigError, jobs
from kd_lightning.study.spec import require

SUPERVISED = "kd_lightning.methods.Supervised"


def _load_config(path: Path) -> dict:
    require(path.is_file(), f"born-again: config {path} not found.")
    cfg = yaml.safe_load(path.read_text()) or {}
    model = cfg.get("model")
    require(isinstance(model, dict) and "class_path" in model, f"born-again: {path} has no "
            f"model.class_path; give a kd-lightning fit config of a distillation method, e.g. "
            f"kd_lightning.methods.ResponseKD.")
    init = model.get("init_args") or {}
    require("student" in init, f"born-again: {path} has no model.init_args.student; every generation "
            f"trains that architecture.")
    require(init.get("teacher") is None and init.get("teacher_checkpoint") is None, f"born-again: {path} "
            f"sets model.init_args.teacher/teacher_checkpoint; remove them: generation k's teacher is "
            f"generation k - 1.")
    return cfg


def generation_config(cfg: dict, k: int, output: Path, pure_kd: bool = False) -> dict:
    """The ``kd-lightning fit`` config of generation ``k`` (see the module docstring)."""
    from kd_lightning.methods import DistillationModule

    gen = copy.deepcopy(cfg)
    model, init = gen["model"], dict(gen["model"].get("init_args") or {})
    if k == 0:
        base_args = set(inspect.signature(DistillationModule.__init__).parameters) - {"self"}
        init = {key: v for key, v in init.items() if key in base_args}
        model["class_path"] = SUPERVISED
    else:
        cls = pydoc.locate(model["class_path"])
        require(cls is not None, f"born-again: model.class_path {model['class_path']!r} cannot be imported.")
        require(getattr(cls, "requires_teacher", False), f"born-again: {model['class_path']} does not distil "
                f"from a teacher network; give a method that does (e.g. kd_lightning.methods.ResponseKD) in "
                f"model.class_path.")
        init.update(teacher=copy.deepcopy(init["student"]),
                    teacher_checkpoint=str(checkpoint_dir(output, k - 1) / "best.ckpt"))
        if pure_kd:
            init["ce_weight"], init["kd_weight"] = 0.0, 1.0
    model["init_args"] = init
    gen["seed_everything"] = int(cfg.get("seed_everything") or 0) + k
    gen["trainer"] = {**(gen.get("trainer") or {}), "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(output), "name": f"gen{k}", "version": "run"}}}
    return gen


def checkpoint_dir(output: Path, k: int) -> Path:
    return output / f"gen{k}" / "run" / "checkpoints"


def run_generations(config: str | Path, generations: int, output: str | Path,
                    extra: list[str] | None = None, pure_kd: bool = False,
                    overwrite: bool = False, log=print) -> list[dict]:
    """Train generations ``0..generations-1`` (skipping finished ones), then evaluate each and the
    ensembles of generations ``0..k`` on the test split. Returns one row per generation."""
    config, output, extra = Path(config), Path(output).resolve(), list(extra or [])
    require(generations >= 1, f"born-again: --generations must be >= 1, got {generations}.")
    cfg = _load_config(config)
    gen_cfgs = [yaml.safe_dump(generation_config(cfg, k, output, pure_kd), sort_keys=False)
                for k in range(generations)]
    paths, parsed_runs = [output / f"gen{k}.yaml" for k in range(generations)], []
    with tempfile.TemporaryDirectory() as tmp:  # every generation must parse before anything is written
        for k, text in enumerate(gen_cfgs):
            (Path(tmp) / f"gen{k}.yaml").write_text(text)
            parsed_runs.append(jobs.parse_run(str(Path(tmp) / f"gen{k}.yaml"), extra,
                                          f"born-again generation {k}"))
    identity = hashlib.sha256(json.dumps({"config": config.read_text(), "args": extra,
                                          "pure_kd": pure_kd}).encode()).hexdigest()[:16]
    jobs.claim_output(output, "born_again.json", identity,
                      ("born_again.json", "results.md", "results.csv", "gen*"), overwrite,
                      "born-again run", "generations of another configuration (config file, "
                      "arguments or --pure-kd differ)")
    (output / "born_again.json").write_text(json.dumps({"hash": identity}))
    for path, text in zip(paths, gen_cfgs):
        path.write_text(text)
    for k, parsed in enumerate(parsed_runs):
        done, best = output / f"gen{k}" / "result.json", checkpoint_dir(output, k) / "best.ckpt"
        if done.is_file():
            log(f"generation {k}: finished before ({json.loads(done.read_text())['test_acc']:.4f}), skipped")
            continue
        args, last = ["fit", "--config", str(paths[k]), *extra], checkpoint_dir(output, k) / "last.ckpt"
        if last.is_file():
            args += ["--ckpt_path", str(last)]
            log(f"generation {k}: resuming from {last}")
        else:
            log(f"generation {k}: training" + (" (labels only)" if k == 0 else f" from generation {k - 1}"))
        job = jobs.Job(args, output / f"gen{k}" / "run.log", jobs.needs_subprocess(parsed))
        try:
            metrics = jobs.run_job(job).metrics
        except jobs.JobFailed as err:
            raise KDConfigError(f"born-again: generation {k} failed ({err}); see {job.log}. Finished "
                                f"generations are kept; rerun the command to continue.") from None
        require(best.is_file() and "test/acc" in metrics, f"born-again: generation {k} wrote no {best} or "
                f"no test/acc (is validation switched off?); see {job.log}.")
        done.write_text(json.dumps({"test_acc": metrics["test/acc"], "checkpoint": str(best)}))
        log(f"generation {k}: test accuracy {metrics['test/acc']:.4f}")
    rows = evaluate_generations(paths[0], [checkpoint_dir(output, k) / "best.ckpt"
                                           for k in range(generations)], extra)
    for k, row in enumerate(rows):
        row["logged_test_acc"] = json.loads((output / f"gen{k}" / "result.json").read_text())["test_acc"]
    (output / "results.md").write_text(results_table(rows) + "\n")
    with open(output / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


@torch.no_grad()
def evaluate_generations(gen0_config: Path, checkpoints: list[Path], extra: list[str]) -> list[dict]:
    """Test accuracy of each generation's student and of the ensemble (mean softmax) of
    generations ``0..k``, on the test split of the generation-0 config's data module."""
    cli = jobs.build(["--config", str(gen0_config), *extra, "--trainer.logger", "false", "--trainer.devices",
                      "1", "--trainer.strategy", "auto", "--trainer.accelerator", "cpu"])
    student, dm = cli.model.student, cli.datamodule
    dm.setup("test")
    loader, probs = dm.test_dataloader(), []
    for ckpt in checkpoints:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        student.load_state_dict({k.removeprefix("student."): v for k, v in state.items()
                                 if k.startswith("student.")})
        student.eval()
        probs.append(torch.cat([student(x).float().softmax(-1) for x, _, _ in loader]))
    y = torch.cat([y for _, y, _ in loader])
    return [{"generation": k, "teacher": "labels" if k == 0 else f"generation {k - 1}",
             "test_acc": float((p.argmax(-1) == y).float().mean()),
             "ensemble_test_acc": float((torch.stack(probs[:k + 1]).mean(0).argmax(-1) == y).float().mean())}
            for k, p in enumerate(probs)]


def results_table(rows: list[dict]) -> str:
    head = ["| generation | trained from | test acc. (%) | ensemble of generations 0..k (%) |",
            "|---|---|---|---|"]
    return "\n".join(head + [f"| {r['generation']} | {r['teacher']} | {100 * r['test_acc']:.2f} | "
                             f"{100 * r['ensemble_test_acc']:.2f} |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kd-lightning-born-again",
        allow_abbrev=False,  # a misspelt option is an error, never taken for a longer one
        description="Born-again networks (Furlanello et al. 2018): generation 0 on the labels, generation k "
                    "distilled from generation k-1 (same architecture); reports each generation's test "
                    "accuracy and that of their ensemble.",
        epilog="Any other argument (e.g. --trainer.max_epochs 50) goes to every generation's kd-lightning "
               "fit.")
    add = parser.add_argument
    add("--config", required=True, help="kd-lightning fit config of the method, without a teacher")
    add("--generations", type=int, default=3, help="including generation 0")
    add("--output", help="folder of the generations (default: born_again/<config>)")
    add("--pure-kd", action="store_true", help="generations >= 1 on the soft targets alone (ce_weight 0, "
                                               "kd_weight 1)")
    add("--overwrite", action="store_true", help="delete another configuration's generations in --output")
    args, extra = parser.parse_known_args(argv)
    output = Path(args.output or Path("born_again") / Path(args.config).stem)
    jobs.quiet_lightning()
    try:
        rows = run_generations(args.config, args.generations, output, extra, args.pure_kd, args.overwrite)
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
