"""The study YAML: every bad entry is refused before anything runs, in one paragraph."""

from __future__ import annotations

import pytest

from kd_lightning.study import load_study, main
from kd_lightning.study.spec import PerBudget
from tests.conftest import CONFIGS
from tests.study.test_study import KD, STUDENT, write_study


def _error(tmp_path, capsys, **over) -> str:
    cfg = write_study(tmp_path, **over)
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-lightning-study: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # one paragraph
    assert not (tmp_path / "out").exists()  # refused before anything was written
    return err


def test_unknown_keys_are_named_with_the_valid_ones(tmp_path, capsys):
    err = _error(tmp_path, capsys, step=10)
    assert "unknown key(s) 'step'" in err and "steps" in err and "epochs" in err
    err = _error(tmp_path, capsys, methods=[{**KD, "gird": {"model.init_args.kd_weight": [0.5]}}])
    assert "method 'ResponseKD'" in err and "'gird'" in err and "grid" in err


def test_unknown_method_lists_valid_ones(tmp_path, capsys):
    err = _error(tmp_path, capsys, methods=[{**STUDENT, "method": "HintonKD"}])
    assert "unknown method 'HintonKD'" in err and "ResponseKD" in err and "Supervised" in err
    err = _error(tmp_path, capsys, methods=[{**KD, "method": "Supervised"}])
    assert "says method: Supervised" in err and "ResponseKD" in err


def test_run_arguments_that_do_not_parse(tmp_path, capsys):
    err = _error(tmp_path, capsys, methods=[{**KD, "args": ["--model.init_args.temprature=2"]}])
    assert "method 'ResponseKD'" in err and "does not parse" in err and "temprature" in err
    err = _error(tmp_path, capsys, methods=[{**KD, "set": {"model.init_args.temprature": 2}}])
    assert "'model.init_args.temprature' is not an argument" in err and "temperature" in err
    err = _error(tmp_path, capsys, methods=[{**KD, "grid": {"model.init_args.temperature": [1, "hot"]}}])
    assert "M=20" in err and "do not parse" in err and "hot" in err


def test_per_budget_values_must_cover_every_budget(tmp_path, capsys):
    err = _error(tmp_path, capsys, methods=[{**KD, "set": {"model.init_args.kd_weight": {20: 0.5}}}])
    assert "'set: model.init_args.kd_weight'" in err and "no value for M=50" in err and "default" in err
    err = _error(tmp_path, capsys, methods=[{**KD, "grid": {"model.init_args.kd_weight": {20: [0.5], 50: []}}}])
    assert "no list of candidates for M=50" in err
    err = _error(tmp_path, capsys, set={"data.batch_size": {20: 10, "size": 5}})
    assert "mixes budgets and other keys ('size')" in err


def test_training_length_is_steps_or_epochs_per_budget(tmp_path, capsys):
    err = _error(tmp_path, capsys, steps=100, epochs=3)
    assert "both 'steps' and 'epochs' apply to M=20" in err
    err = _error(tmp_path, capsys, steps={20: 4, 50: 5}, epochs={50: 3, "default": 2})
    assert "both 'steps' and 'epochs' give a value for M=50" in err
    err = _error(tmp_path, capsys, steps={20: 4}, budgets=[20, 50, "full"])
    assert "no training length for M=50" in err
    assert "must be a positive integer" in _error(tmp_path, capsys, steps={20: 4, 50: 0})
    # a plain step count with epochs for the full set is fine: named budgets win
    spec = load_study(write_study(tmp_path, steps=100, epochs={"full": 3}, budgets=[20, "full"]))
    assert spec.length(20) == ("steps", 100) and spec.length(None) == ("epochs", 3)


def test_settings_the_study_controls_are_refused(tmp_path, capsys):
    err = _error(tmp_path, capsys, set={"data.train_subset": 10})
    assert "data.train_subset" in err and "the study sets itself" in err
    err = _error(tmp_path, capsys, methods=[{**KD, "grid": {"seed_everything": [1, 2]}}])
    assert "seed_everything" in err and "the study sets itself" in err


def test_study_wide_setting_no_method_has(tmp_path, capsys):
    err = _error(tmp_path, capsys, set={"model.init_args.temprature": 2})
    assert "none of the methods' runs" in err


def test_teacher_network_must_be_the_study_teachers(tmp_path, capsys):
    kd = {**KD, "args": ["--model.init_args.teacher.init_args.width", "32"]}
    err = _error(tmp_path, capsys, methods=[kd])
    assert "distils from the teacher network kd_lightning.models.ConvNet1D(" in err
    assert "width=32" in err and "width=64" in err
    assert str(CONFIGS / "mnist1d/teacher.yaml") in err  # the study's own teacher config


def test_bad_budgets_seeds_presets_and_names(tmp_path, capsys):
    assert "budget 'half'" in _error(tmp_path, capsys, budgets=[20, "half"])
    assert "budget 0" in _error(tmp_path, capsys, budgets=[0])
    assert "must not repeat" in _error(tmp_path, capsys, seeds=[0, 0])
    assert "must be unique" in _error(tmp_path, capsys, methods=[KD, KD])
    cfg = write_study(tmp_path, presets={"quick": {"seeds": [0]}})
    assert main(["--config", str(cfg), "--preset", "fast"]) == 2
    assert "preset 'fast' is not defined" in capsys.readouterr().err
    cfg = write_study(tmp_path, presets={"quick": {"seed": [0]}})
    assert main(["--config", str(cfg), "--preset", "quick"]) == 2
    assert "preset 'quick'" in capsys.readouterr().err


def test_per_budget_mapping_and_plain_mapping_values(tmp_path):
    spec = load_study(write_study(tmp_path, budgets=[20, "full"], methods=[{**KD, "set": {
        "model.init_args.kd_weight": {"full": 0.9, "default": 0.5},
        "model.init_args.student": {"class_path": "kd_lightning.models.MLP",
                                    "init_args": {"input_dim": 40, "hidden_dims": [20]}}}}]))
    (kd,) = spec.methods
    assert kd.set["model.init_args.kd_weight"] == PerBudget({None: 0.9}, 0.5)
    assert spec.settings(kd, 20)["model.init_args.kd_weight"] == 0.5
    assert spec.settings(kd, None)["model.init_args.kd_weight"] == 0.9
    student = spec.run_config(kd, spec.settings(kd, 20)).model.init_args.student
    assert student.class_path == "kd_lightning.models.MLP" and student.init_args.hidden_dims == [20]


@pytest.mark.parametrize("path", sorted((CONFIGS / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_configs_and_presets_load(path):
    import yaml

    presets = [None, *(yaml.safe_load(path.read_text()).get("presets") or {})]
    for preset in presets:
        spec = load_study(path, preset)
        if preset is None:  # a preset may run part of the study (one method, one budget)
            assert any(m.reference for m in spec.methods)
        for b in spec.budgets:
            spec.length(b)
            for m in spec.methods:
                assert spec.candidates(m, b)


def test_quick_preset_of_the_mnist1d_study():
    quick = load_study(CONFIGS / "studies/mnist1d.yaml", "quick")
    assert quick.budgets == [50, 100, 500, None] and quick.seeds == [0, 1] and quick.steps == 500
    assert quick.name == "mnist1d-quick" and quick.output == "studies/mnist1d-quick"


# ---- budgets per class ------------------------------------------------------------------
def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_budget_unit_per_class_reaches_the_runs_the_identity_and_the_table(tmp_path):
    from kd_lightning.study.results import format_table, results_markdown
    from kd_lightning.study.runner import StudyRunner

    total = load_study(write_study(tmp_path, name="total.yaml"))
    explicit = load_study(write_study(tmp_path, name="explicit.yaml", budget_unit="total"))
    per_class = load_study(write_study(tmp_path, name="per_class.yaml", budget_unit="per_class",
                                       budgets=[2, 5, "full"], epochs={"full": 1}))
    # the default keeps every existing study's identity (and hash); per class is another study
    assert total.budget_unit == "total" and "budget_unit" not in total.identity()
    assert explicit.hash() == total.hash()
    assert per_class.identity()["budget_unit"] == "per_class"
    assert load_study(write_study(tmp_path, name="pc.yaml", budget_unit="per_class")).hash() != total.hash()

    def plan_args(spec, budget):
        runner = StudyRunner(spec, tmp_path / "out", [], False, tmp_path / "t", progress=False)
        plan = runner.plan(spec.methods[0], budget, 0, {}, "run")
        return plan, plan.jobs[0].args

    plan, args = plan_args(per_class, 5)  # 5 per class of MNIST-1D's 10 classes: 50 examples
    assert _flag(args, "--data.train_subset_per_class") == "5" and _flag(args, "--data.train_subset") == "null"
    same, total_args = plan_args(total, 50)
    assert _flag(total_args, "--data.train_subset") == "50"
    assert "--data.train_subset_per_class" not in total_args  # the runs of a total study are as before
    assert (plan.epochs, plan.steps) == (same.epochs, same.steps)  # 50 examples either way
    _, full = plan_args(per_class, None)
    assert _flag(full, "--data.train_subset_per_class") == "null"

    rows = [{"method": "student alone", "M": "5", "seed": s, "test_acc": 50.0 + s, "kind": "run",
             "candidate": "", "val_acc": ""} for s in (0, 1)]
    assert "| M (per class) | student alone | ResponseKD |" in results_markdown(per_class, "h", rows, None)
    assert format_table(rows, ["student alone"], [5], "total").startswith("| M (labelled examples) |")


def test_budget_unit_must_be_total_or_per_class(tmp_path, capsys):
    err = _error(tmp_path, capsys, budget_unit="per_label")
    assert "budget_unit" in err and "'total'" in err and "'per_class'" in err
    err = _error(tmp_path, capsys, set={"data.train_subset_per_class": 10})
    assert "data.train_subset_per_class" in err and "the study sets itself" in err


def test_a_per_class_budget_larger_than_a_class_is_refused_before_anything_runs(tmp_path, capsys):
    err = _error(tmp_path, capsys, budget_unit="per_class", budgets=[2, 5000])
    assert "budget M=5000 cannot be run" in err and "train_subset_per_class=5000" in err
