"""Factor transfer as a method: the paraphraser stage, the student stage, and resuming in either."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from kd_lightning.methods import FactorTransfer
from tests.conftest import CONFIGS, TINY, run_cli, tb_scalars
from tests.methods.test_auxiliary_modules import _at_epoch, _batch, _make, _manual_maps


def test_factor_transfer_terms_in_each_stage():
    m = _make(FactorTransfer, stage1_epochs=2, transfer_weight=500.0)
    x, y, idx = _batch()
    _, t = _manual_maps(m.teacher, x)
    _, s = _manual_maps(m.student, x)
    _at_epoch(m, 1)  # stage 1: the paraphraser's reconstruction error, nothing else
    assert m.stage == 1
    stage1 = m.compute_losses(x, y, idx)
    assert list(stage1.terms) == ["loss_rec"] and stage1.logits is None
    assert torch.allclose(stage1.terms["loss_rec"], (m.paraphraser(t[2])[1] - t[2]).pow(2).mean())
    _at_epoch(m, 2)  # stage 2: CE + 500 x mean |F_T/|F_T| - F_S/|F_S||
    assert m.stage == 2
    stage2 = m.compute_losses(x, y, idx)
    assert list(stage2.terms) == ["loss_ce", "loss_ft"]
    f_t = F.normalize(m.paraphraser.encoder(t[2]).flatten(1), dim=1)
    f_s = F.normalize(m.translator(s[2]).flatten(1), dim=1)
    assert torch.allclose(stage2.terms["loss_ft"], 500.0 * (f_t - f_s).abs().mean())
    assert torch.allclose(stage2.terms["loss_ce"], F.cross_entropy(m.student(x), y))
    assert m.paraphraser.factor_channels == 16  # k = 0.5 of the teacher's 32 channels


def test_factor_transfer_single_stage_trains_paraphraser_and_student_together():
    m = _make(FactorTransfer, stage1_epochs=0)
    x, y, idx = _batch()
    losses = m.compute_losses(x, y, idx)
    assert list(losses.terms) == ["loss_rec", "loss_ce", "loss_ft"]
    sum(losses.terms.values()).backward()
    assert m.paraphraser.encoder[0].weight.grad is not None  # from the reconstruction only
    assert m.translator.encoder[0].weight.grad is not None and m.student.conv1.weight.grad is not None


def test_factor_transfer_stage1_trains_the_paraphraser_only():
    m = _make(FactorTransfer, stage1_epochs=1)
    _at_epoch(m, 0)
    m.training_step(_batch(), 0).backward()
    assert all(p.grad is not None for p in m.paraphraser.parameters())
    assert all(p.grad is None for p in m.student.parameters())
    assert all(p.grad is None for p in m.translator.parameters())


# ---- stages and resuming --------------------------------------------------------------------
def _every_epoch(tmp_path: Path) -> Path:
    path = tmp_path / "every_epoch.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ckpts", "filename": "{epoch}", "save_top_k": -1,
                       "every_n_epochs": 1}}]}}))
    return path


def _state(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_factor_transfer_resumes_in_either_stage(mnist1d_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", CONFIGS / "mnist1d/ft.yaml", "--config", _every_epoch(tmp_path), *TINY,
            "--trainer.limit_train_batches", "1", "--trainer.max_epochs", "4",
            "--model.init_args.stage1_epochs", "2", "--model.init_args.teacher_checkpoint",
            mnist1d_teacher, "--data.train_subset", "100", "--test_after_fit", "false",
            "--trainer.limit_val_batches", "0"]
    first = run_cli(args)
    assert tb_scalars(Path(first.trainer.log_dir))["stage"] == [1.0, 1.0, 2.0, 2.0]
    ck = {e: tmp_path / f"ckpts/epoch={e}.ckpt" for e in range(4)}
    # stage 1 trains the paraphraser alone; stage 2 leaves it frozen
    assert _same(_state(ck[0], "student."), _state(ck[1], "student."))
    assert not _same(_state(ck[0], "paraphraser."), _state(ck[1], "paraphraser."))
    para = _state(ck[1], "paraphraser.")
    assert _same(para, _state(ck[2], "paraphraser.")) and _same(para, _state(ck[3], "paraphraser."))
    assert not _same(_state(ck[1], "student."), _state(ck[3], "student."))
    assert not _same(_state(ck[1], "translator."), _state(ck[3], "translator."))
    from_stage1 = run_cli(args + ["--ckpt_path", ck[0]])
    s1 = tb_scalars(Path(from_stage1.trainer.log_dir))
    assert s1["stage"] == [1.0, 2.0, 2.0] and "train/loss_rec" in s1 and "train/loss_ft" in s1
    from_stage2 = run_cli(args + ["--ckpt_path", ck[2]])
    s2 = tb_scalars(Path(from_stage2.trainer.log_dir))
    assert s2["stage"] == [2.0] and "train/loss_rec" not in s2
    # the resumed stage 2 used the restored paraphraser, unchanged
    assert _same(para, {k: v for k, v in from_stage2.model.state_dict().items() if k in para})
