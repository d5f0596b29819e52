"""benchmarks/cifar100_table.py: the CIFAR-100 table script (plan, recipe overrides, smoke run)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "cifar100_table.py"
CIFAR_CONFIGS = REPO / "configs" / "cifar100"


@pytest.fixture(scope="module")
def table_mod():
    spec = importlib.util.spec_from_file_location("cifar100_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cifar100_table"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _cfg(name: str) -> dict:
    return yaml.safe_load((CIFAR_CONFIGS / name).read_text())


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_epochs_override_scales_the_recipe(table_mod):
    # 240 -> 24 epochs: everything counted in epochs x 0.1
    kd = table_mod.epoch_overrides(_cfg("response_resnet56_resnet20.yaml"), 24)
    assert _flag(kd, "--trainer.max_epochs") == "24"
    assert json.loads(_flag(kd, "--model.init_args.lr_scheduler.init_args.milestones")) == [15, 18, 21]
    # AB: 30 epochs of transfer + 240 of training = 270 -> 27; milestones 180/210/240 -> 18/21/24;
    # its stage1_epochs is a fraction of max_epochs, so it is left alone
    ab = table_mod.epoch_overrides(_cfg("ab_resnet56_resnet20.yaml"), 24)
    assert _flag(ab, "--trainer.max_epochs") == "27"
    assert json.loads(_flag(ab, "--model.init_args.lr_scheduler.init_args.milestones")) == [18, 21, 24]
    assert "--model.init_args.stage1_epochs" not in ab
    # an epoch count given as an integer scales too; no milestone drops to 0
    cfg = {"trainer": {"max_epochs": 240}, "model": {"init_args": {
        "warmup_epochs": 20, "lr_scheduler": {"init_args": {"milestones": [1, 150]}}}}}
    out = table_mod.epoch_overrides(cfg, 12)
    assert _flag(out, "--model.init_args.warmup_epochs") == "1"
    assert json.loads(_flag(out, "--model.init_args.lr_scheduler.init_args.milestones")) == [1, 8]
    assert table_mod.epoch_overrides(cfg, None) == []
    with pytest.raises(table_mod.KDConfigError, match="--epochs"):
        table_mod.epoch_overrides(cfg, 0)


def test_ddp_keeps_the_global_batch_and_lets_two_stage_methods_run(table_mod):
    kd = table_mod.ddp_overrides(_cfg("response_resnet56_resnet20.yaml"), 4, None)
    assert _flag(kd, "--trainer.devices") == "4" and _flag(kd, "--trainer.strategy") == "ddp"
    assert _flag(kd, "--data.batch_size") == "16"  # 4 x 16 = the recipe's 64
    assert _flag(kd, "--trainer.sync_batchnorm") == "true"
    no_sync = table_mod.ddp_overrides(_cfg("response_resnet56_resnet20.yaml"), 4, None, sync_bn=False)
    assert _flag(no_sync, "--trainer.sync_batchnorm") == "false"  # CPU processes: no SyncBatchNorm
    ab = table_mod.ddp_overrides(_cfg("ab_resnet56_resnet20.yaml"), 2, None)
    assert _flag(ab, "--trainer.strategy") == "ddp_find_unused_parameters_true"
    assert _flag(table_mod.ddp_overrides(_cfg("ab_resnet56_resnet20.yaml"), 2, "ddp_spawn"),
                 "--trainer.strategy") == "ddp_spawn"
    one = table_mod.ddp_overrides(_cfg("response_resnet56_resnet20.yaml"), 1, None)
    assert one == ["--trainer.devices", "1"]
    with pytest.raises(table_mod.KDConfigError, match="cannot be split over 3 devices"):
        table_mod.ddp_overrides(_cfg("response_resnet56_resnet20.yaml"), 3, None)


def test_missing_configs_become_skipped_rows(table_mod, tmp_path):
    # a config folder with the resnet56 teacher, the student and KD only
    for name in ("teacher_resnet56.yaml", "student_resnet20.yaml", "response_resnet56_resnet20.yaml",
                 "student_resnet8x4.yaml", "response_resnet32x4_resnet8x4.yaml"):
        shutil.copy(CIFAR_CONFIGS / name, tmp_path / name)
    pairs = ["resnet56_resnet20", "resnet32x4_resnet8x4"]
    table = table_mod.plan(pairs, ["student", "response", "sp"], tmp_path, [], None, 1, None, {})
    r56, r32 = table["resnet56_resnet20"], table["resnet32x4_resnet8x4"]
    assert isinstance(r56["response"], table_mod.Run) and r56["response"].teacher is r56["teacher"]
    assert r56["student"].teacher is None  # the student-alone baseline needs no teacher
    assert r56["sp"].startswith("no config") and "sp_resnet56_resnet20.yaml" in r56["sp"]
    # no teacher config for resnet32x4: its student still runs, its methods cannot
    assert r32["teacher"].startswith("no config") and isinstance(r32["student"], table_mod.Run)
    assert r32["response"].startswith("no teacher")

    md = table_mod.format_table(table, ["teacher", "student", "response", "sp"],
                                table_mod.load_published(), "# header")
    sp_row = next(line for line in md.splitlines() if "(`sp`)" in line)
    assert "skipped: no config" in sp_row
    assert "`sp` not run, no config: `" in md and "sp_resnet56_resnet20.yaml`" in md
    kd_row = next(line for line in md.splitlines() if "(`response`)" in line)
    assert kd_row.count("not run yet") == 1 and "skipped: no teacher" in kd_row


def test_a_given_teacher_checkpoint_replaces_the_teacher_run(table_mod, tmp_path):
    ckpt = tmp_path / "t.ckpt"
    ckpt.write_bytes(b"weights")
    table = table_mod.plan(["resnet56_resnet20"], ["response"], CIFAR_CONFIGS, [], None, 1, None,
                           {"resnet56": ckpt})
    row = table["resnet56_resnet20"]
    assert row["teacher"].startswith("given")
    kd = row["response"]
    assert kd.teacher is None and kd.teacher_ckpt == ckpt
    args = kd.args(tmp_path / "out", tmp_path / "data")
    assert _flag(args, "--model.init_args.teacher_checkpoint") == str(ckpt)
    before = kd.run_hash
    ckpt.write_bytes(b"other weights")  # another teacher: the student runs are not the same runs
    assert kd.run_hash != before


def test_run_identity_follows_config_settings_and_teacher(table_mod, tmp_path):
    for name in ("teacher_resnet56.yaml", "response_resnet56_resnet20.yaml"):
        shutil.copy(CIFAR_CONFIGS / name, tmp_path / name)

    def hashes(epochs=None, data="cifar100"):
        row = table_mod.plan(["resnet56_resnet20"], ["response"], tmp_path, [], epochs, 1, None, {},
                             data=data)["resnet56_resnet20"]
        return row["teacher"].run_hash, row["response"].run_hash

    t0, s0 = hashes()
    assert hashes() == (t0, s0)  # rerunning the same command finds the same runs
    assert hashes(epochs=24)[1] != s0
    assert hashes(data="synthetic")[1] != s0  # smoke results never count as real ones
    cfg = tmp_path / "teacher_resnet56.yaml"
    cfg.write_text(cfg.read_text().replace("max_epochs: 240", "max_epochs: 200"))
    t1, s1 = hashes()
    assert t1 != t0 and s1 != s0  # a new teacher makes new student runs


def test_published_figures_cite_a_source_and_explain_blanks(table_mod):
    pub = table_mod.load_published()
    for key in ["teacher", "student", *table_mod.METHOD_ORDER]:
        row = pub["rows"][key]
        src = pub["sources"][row["source"]]
        assert src["url"].startswith("https://github.com/") and src["short"] and src["cite"]
        figures = row.get("published") or {}
        for pair, value in figures.items():
            assert pair in table_mod.PAIRS and 0 < value < 100
        if set(figures) != set(table_mod.PAIRS):
            assert row.get("missing"), f"row {key} leaves a pair blank without saying why"


def test_synthetic_files_are_read_by_the_cifar100_loader(table_mod, tmp_path):
    from kd_lightning.data.sources import load_source

    table_mod.write_synthetic_cifar100(tmp_path, n_train=120, n_test=30)
    s = load_source("cifar100", str(tmp_path))
    assert tuple(s.x_train.shape) == (120, 3, 32, 32) and tuple(s.x_test.shape) == (30, 3, 32, 32)
    assert s.num_classes == 100 and int(s.y_train.max()) == 99


def test_bad_arguments_are_refused_before_anything_runs(table_mod, tmp_path, capsys):
    def run(*args):
        code = table_mod.main([*args, "--out", str(tmp_path / "o")])
        return code, capsys.readouterr().err

    code, err = run("--pairs", "resnet56_resnet9")
    assert code == 2 and "valid pairs: resnet56_resnet20" in err
    code, err = run("--teacher-ckpt", "resnet56=/nowhere.ckpt")
    assert code == 2 and "does not exist" in err
    code, err = run("--data-root", str(tmp_path / "empty"))
    assert code == 2 and "CIFAR-100 not found" in err and "--synthetic" in err
    assert not (tmp_path / "o").exists()


def _table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_synthetic_smoke_run_fills_the_table_and_resumes(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--synthetic", "--max-steps", "2",
           "--pairs", "resnet56_resnet20", "--methods", "student", "response", "at", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    md = (out / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert "resnet56 → resnet20 measured" in header and "published" in header
    rows = _table_rows(md)
    pub = yaml.safe_load((REPO / "benchmarks" / "cifar100_published.yaml").read_text())["rows"]
    for key, label in [("teacher", "Teacher"), ("student", "Student alone"),
                       ("response", f"{pub['response']['label']} (`response`)"),
                       ("at", f"{pub['at']['label']} (`at`)")]:
        measured, published, source = rows[label]
        assert 0.0 <= float(measured) <= 100.0
        assert float(published) == pub[key]["published"]["resnet56_resnet20"]
        assert "RepDistiller" in source
    assert "Synthetic data" in md
    assert "[crd]: https://github.com/HobbitLong/RepDistiller" in md

    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == ["at", "response", "student", "teacher"]
    assert all(r["synthetic"] and r["max_steps"] == 2 for r in records)
    # the distillation runs loaded the teacher this script trained
    teacher_dir = next(r["run_dir"] for r in records if r["method"] == "teacher")
    for r in records:
        if r["method"] in ("response", "at"):
            log = (Path(r["run_dir"]) / "run.log").read_text()
            assert re.search(rf"teacher_checkpoint {re.escape(teacher_dir)}/checkpoints/\w+\.ckpt", log)

    # rerunning the same command trains nothing and appends nothing
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert again.returncode == 0
    assert again.stdout.count("finished earlier") == 4 and "[run]" not in again.stdout
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
