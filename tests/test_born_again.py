"""Born-again networks (Furlanello et al. 2018): generations, their teachers, reruns, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning import KDConfigError, jobs
from kd_lightning import born_again
from kd_lightning.born_again import checkpoint_dir, generation_config, main, run_generations
from tests.conftest import CONFIGS, TINY

CONFIG = CONFIGS / "mnist1d" / "born_again.yaml"


def _student_state(ckpt: Path, prefix: str = "student.") -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_generation_configs(tmp_path):
    cfg = yaml.safe_load(CONFIG.read_text())
    gen0 = generation_config(cfg, 0, tmp_path)
    assert gen0["model"]["class_path"] == "kd_lightning.methods.Supervised"
    assert "temperature" not in gen0["model"]["init_args"]  # the method's own arguments are dropped
    assert gen0["model"]["init_args"]["student"] == cfg["model"]["init_args"]["student"]
    gen2 = generation_config(cfg, 2, tmp_path)
    init = gen2["model"]["init_args"]
    assert gen2["model"]["class_path"] == cfg["model"]["class_path"]
    assert init["teacher"] == init["student"]  # the same architecture
    assert init["teacher_checkpoint"] == str(checkpoint_dir(tmp_path, 1) / "best.ckpt")
    assert (init["ce_weight"], init["kd_weight"]) == (1.0, 1.0)
    assert gen2["seed_everything"] == cfg["seed_everything"] + 2
    assert gen2["trainer"]["logger"]["init_args"] == {"save_dir": str(tmp_path), "name": "gen2",
                                                      "version": "run"}
    pure = generation_config(cfg, 1, tmp_path, pure_kd=True)["model"]["init_args"]
    assert (pure["ce_weight"], pure["kd_weight"]) == (0.0, 1.0)
    assert "teacher" not in cfg["model"]["init_args"]  # the user's config is left alone


def test_generations_distil_from_the_previous_one_and_reruns_skip_finished_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ban"
    extra = [*TINY, "--data.train_subset", "200"]
    rows = run_generations(CONFIG, 2, out, extra, log=lambda s: None)
    assert [r["generation"] for r in rows] == [0, 1]
    for k in (0, 1):
        assert json.loads((out / f"gen{k}" / "result.json").read_text())["checkpoint"].endswith(
            f"gen{k}/run/checkpoints/best.ckpt")
    # generation 1's frozen teacher is generation 0's best student, and it trained a new student
    gen0 = _student_state(checkpoint_dir(out, 0) / "best.ckpt")
    gen1_teacher = _student_state(checkpoint_dir(out, 1) / "best.ckpt", "teacher.")
    gen1_student = _student_state(checkpoint_dir(out, 1) / "best.ckpt")
    assert gen0.keys() == gen1_teacher.keys()
    assert all(torch.equal(gen0[k], gen1_teacher[k]) for k in gen0)
    assert not all(torch.equal(gen0[k], gen1_student[k]) for k in gen0)
    assert rows[0]["ensemble_test_acc"] == rows[0]["test_acc"]
    table = (out / "results.md").read_text()
    assert "| 1 | generation 0 |" in table and (out / "results.csv").is_file()

    # a rerun trains nothing that is finished; a third generation starts from generation 1
    calls = []
    real = jobs.run_job

    def spy(job, on_epoch=None):
        calls.append(job.args)
        return real(job, on_epoch)

    monkeypatch.setattr(jobs, "run_job", spy)
    rows = run_generations(CONFIG, 3, out, extra, log=lambda s: None)
    assert len(calls) == 1 and str(out / "gen2.yaml") in calls[0]
    gen2_teacher = _student_state(checkpoint_dir(out, 2) / "best.ckpt", "teacher.")
    gen1 = _student_state(checkpoint_dir(out, 1) / "best.ckpt")
    assert all(torch.equal(gen1[k], gen2_teacher[k]) for k in gen1)
    assert len(rows) == 3

    # killed inside generation 2 (its last.ckpt written, no result yet): resumed from last.ckpt
    (out / "gen2" / "result.json").unlink()
    calls.clear()
    run_generations(CONFIG, 3, out, extra, log=lambda s: None)
    assert len(calls) == 1
    assert calls[0][-2:] == ["--ckpt_path", str(checkpoint_dir(out, 2) / "last.ckpt")]

    # other arguments are another configuration: refused, nothing deleted
    with pytest.raises(KDConfigError, match="another configuration"):
        run_generations(CONFIG, 3, out, [*extra, "--data.subset_seed", "1"], log=lambda s: None)
    assert (out / "gen0" / "result.json").is_file()


def test_the_ensemble_averages_the_generations_softmax(tmp_path, monkeypatch):
    """evaluate_generations against a hand-made ensemble of two stored students."""
    from kd_lightning.data import DistillDataModule
    from kd_lightning.models import ConvNet1D

    monkeypatch.chdir(tmp_path)
    cfg = generation_config(yaml.safe_load(CONFIG.read_text()), 0, tmp_path)
    gen0 = tmp_path / "gen0.yaml"
    gen0.write_text(yaml.safe_dump(cfg))
    nets, ckpts = [], []
    for k in range(2):
        torch.manual_seed(k)
        net = ConvNet1D(num_classes=10, width=64, groups=4).eval()
        path = tmp_path / f"{k}.ckpt"
        torch.save({"state_dict": {f"student.{n}": v for n, v in net.state_dict().items()}}, path)
        nets.append(net)
        ckpts.append(path)
    rows = born_again.evaluate_generations(gen0, ckpts, [])
    dm = DistillDataModule("mnist1d")
    dm.setup("test")
    x, y, _ = dm.test_dataset.get_batch(torch.arange(len(dm.test_dataset)))
    with torch.no_grad():
        p = [n(x).softmax(-1) for n in nets]
    acc = lambda q: float((q.argmax(-1) == y).float().mean())  # noqa: E731
    assert rows[0]["test_acc"] == pytest.approx(acc(p[0]))
    assert rows[1]["test_acc"] == pytest.approx(acc(p[1]))
    assert rows[1]["ensemble_test_acc"] == pytest.approx(acc((p[0] + p[1]) / 2))


def test_bad_input_is_refused_before_anything_trains(tmp_path, capsys):
    with_teacher = yaml.safe_load(CONFIG.read_text())
    with_teacher["model"]["init_args"]["teacher"] = with_teacher["model"]["init_args"]["student"]
    bad = tmp_path / "teacher.yaml"
    bad.write_text(yaml.safe_dump(with_teacher))
    assert main(["--config", str(bad), "--output", str(tmp_path / "a")]) == 2
    assert "generation k's teacher is generation k - 1" in capsys.readouterr().err
    assert main(["--config", str(CONFIGS / "mnist1d" / "student_cnn.yaml"),
                 "--output", str(tmp_path / "b")]) == 2
    assert "does not distil from a teacher" in capsys.readouterr().err
    assert main(["--config", str(CONFIG), "--generations", "0", "--output", str(tmp_path / "c")]) == 2
    assert main(["--config", str(CONFIG), "--output", str(tmp_path / "d"),
                 "--model.init_args.temperature", "nope"]) == 2
    assert "does not parse" in capsys.readouterr().err
    # an abbreviation is not taken for --generations: it reaches the runs' parser, which refuses it
    assert main(["--config", str(CONFIG), "--gen", "2", "--output", str(tmp_path / "e")]) == 2
    assert "unrecognized arguments: --gen 2" in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
@pytest.mark.ddp
def test_generations_run_under_two_process_ddp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ban"
    extra = [*TINY, "--data.train_subset", "200", "--trainer.accelerator", "cpu",
             "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    rows = run_generations(CONFIG, 2, out, extra, log=lambda s: None)
    assert len(rows) == 2
    gen0 = _student_state(checkpoint_dir(out, 0) / "best.ckpt")
    gen1_teacher = _student_state(checkpoint_dir(out, 1) / "best.ckpt", "teacher.")
    assert all(torch.equal(gen0[k], gen1_teacher[k]) for k in gen0)
