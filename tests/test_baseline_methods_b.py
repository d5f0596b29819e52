"""VID, FactorTransfer, CRD, OFD and ReviewKD: their terms against explicit computations,
gradients, stages and resuming, the CRD memory bank, bad input, bf16 and DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.losses import hcl_loss, ofd_loss, ofd_margin, ofd_margin_from_bn, review_chain
from kd_lightning.losses.vid import vid_loss
from kd_lightning.methods import CRD, OFD, VID, FactorTransfer, ReviewKD
from kd_lightning.models import ConvNet1D, resnet8, wrn_16_1
from tests.conftest import CONFIGS, TINY, assert_mnist1d_config_refused, run_cli, run_ddp, tb_scalars

LAYERS3 = ["relu1", "relu2", "relu3"]
CONFIG = {VID: "vid.yaml", FactorTransfer: "ft.yaml", CRD: "crd.yaml", OFD: "ofd.yaml",
          ReviewKD: "reviewkd.yaml"}
TERM = {VID: "loss_vid", FactorTransfer: "loss_ft", CRD: "loss_crd", OFD: "loss_ofd",
        ReviewKD: "loss_review"}


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


def _at_epoch(module, epoch: int, max_epochs: int = 10) -> None:
    """Attach a trainer whose current epoch is ``epoch`` (for stage and warm-up checks)."""
    trainer = _trainer(max_epochs=max_epochs)
    trainer.fit_loop.epoch_progress.current.completed = epoch
    module.trainer = trainer


def _nets():
    torch.manual_seed(1)
    return ConvNet1D(width=16), ConvNet1D(width=32)


def _manual_maps(net: ConvNet1D, x: torch.Tensor):
    """Pre- and post-ReLU outputs of the three conv layers, computed step by step."""
    pre, post, h = [], [], x
    for conv in (net.conv1, net.conv2, net.conv3):
        z = conv(h)
        h = torch.relu(z)
        pre.append(z)
        post.append(h)
    return pre, post


def _make(cls, **kw):
    student, teacher = _nets()
    layers = {VID: {"student_layers": LAYERS3}, FactorTransfer: {"student_layer": "relu3"},
              CRD: {"num_data": 60, "num_negatives": 7},
              OFD: {"student_layers": LAYERS3, "margin_source": "data"},
              ReviewKD: {"student_layers": LAYERS3}}[cls]
    m = cls(student=student, teacher=teacher, num_classes=10, input_shape=[1, 40], **{**layers, **kw})
    if cls is OFD:
        torch.manual_seed(2)
        for margin in m.margins:  # margins measured from data elsewhere; any non-positive values here
            margin.copy_(-torch.rand_like(margin))
    if cls is CRD:
        m.bank.set_negative_pool(torch.arange(60), torch.arange(60) % 10)
    return m.train()


def _batch(n: int = 6):
    torch.manual_seed(3)
    idx = torch.tensor([3, 10, 17, 22, 41, 5, 58, 30][:n])
    return torch.randn(n, 1, 40), idx % 10, idx


# ---- the terms against explicit computations -------------------------------------------------
def test_vid_terms():
    m = _make(VID, transfer_weight=0.37)
    x, y, idx = _batch()
    losses = m.compute_losses(x, y, idx)
    _, s = _manual_maps(m.student, x)
    _, t = _manual_maps(m.teacher, x)
    expected = sum(vid_loss(*reg(a), b) for reg, a, b in zip(m.regressors, s, t))
    assert torch.allclose(losses.terms["loss_vid"], 0.37 * expected)
    assert torch.allclose(losses.terms["loss_ce"], F.cross_entropy(m.student(x), y))
    # a regressor per pair: student 16 channels -> hidden 32 -> teacher 32, one variance per channel
    assert m.regressors[0].mean[0].weight.shape == (32, 16, 1) and m.regressors[0].alpha.shape == (32,)
    # the initial variance 5: the NLL of a constant teacher map equals its closed form
    reg = m.regressors[2]
    mu, var = reg(s[2])
    assert torch.allclose(var, torch.full((32,), 5.0), atol=1e-4)
    by_hand = (0.5 * (math.log(5.0) + (t[2] - mu).pow(2) / 5.0)).mean()
    assert torch.allclose(vid_loss(mu, var, t[2]), by_hand, atol=1e-5)


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


def _nce_by_hand(logits: torch.Tensor, log_z: torch.Tensor, num_candidates: int) -> torch.Tensor:
    logits = logits.double()
    k = logits.shape[1] - 1
    p = torch.exp(logits - log_z.double())
    h = p / (p + k / num_candidates)
    return -(torch.log(h[:, 0]).sum() + torch.log(1 - h[:, 1:]).sum()) / logits.shape[0]


def test_crd_terms_negatives_and_bank_update():
    m = _make(CRD, transfer_weight=0.8)
    x, y, idx = _batch()
    memory_s, memory_t = m.bank.memory_s.clone(), m.bank.memory_t.clone()
    losses = m.compute_losses(x, y, idx)
    # by hand: embeddings of the fc inputs, the negatives the seeded sampler draws, the scores
    v_s = m.embed_s(m.student.forward_features(x))
    v_t = m.embed_t(m.teacher.forward_features(x))
    negatives = m.bank.sample_negatives(idx, 7, torch.Generator().manual_seed(0), targets=y)
    labels = torch.arange(60) % 10
    assert (labels[negatives] != y[:, None]).all()  # other classes only
    assert all(len(set(row.tolist())) == 7 for row in negatives)  # without replacement
    contrast = torch.cat([idx[:, None], negatives], 1)
    logits_s = (v_s.double() @ memory_t.double().t()).gather(1, contrast) / 0.07
    logits_t = (v_t.double() @ memory_s.double().t()).gather(1, contrast) / 0.07
    log_z = [torch.log(torch.exp(lg).mean()) + math.log(60) for lg in (logits_s, logits_t)]
    assert torch.allclose(m.bank.log_z.double(), torch.stack(log_z), atol=1e-4)
    crd = _nce_by_hand(logits_s, log_z[0], 60) + _nce_by_hand(logits_t, log_z[1], 60)
    assert torch.allclose(losses.terms["loss_crd"].double(), 0.8 * crd, rtol=1e-4)
    assert torch.allclose(losses.terms["loss_ce"], F.cross_entropy(m.student(x), y))
    # the bank changes only after the backward pass, by momentum 0.5, renormalised
    assert torch.equal(m.bank.memory_s, memory_s)
    sum(losses.terms.values()).backward()
    m.apply_bank_update()
    assert torch.allclose(m.bank.memory_s[idx], F.normalize(0.5 * memory_s[idx] + 0.5 * v_s.detach()))
    assert torch.allclose(m.bank.memory_t[idx], F.normalize(0.5 * memory_t[idx] + 0.5 * v_t.detach()))
    others = torch.ones(60, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(m.bank.memory_s[others], memory_s[others])
    assert m.negative_draws == 1  # the next step draws from a newly seeded sampler


def test_ofd_terms():
    m = _make(OFD, transfer_weight=1e-3)
    x, y, idx = _batch()
    s_pre, _ = _manual_maps(m.student, x)
    t_pre, _ = _manual_maps(m.teacher, x)
    losses = m.compute_losses(x, y, idx)
    connected = [c(s) for c, s in zip(m.connectors, s_pre)]
    assert torch.allclose(losses.terms["loss_ofd"], 1e-3 * ofd_loss(connected, t_pre, m.margins))
    # by hand: margin ReLU target, partial L2 summed per example, stage weights 1/4, 1/2, 1
    explicit = 0.0
    for w, s, t, margin in zip([0.25, 0.5, 1.0], connected, t_pre, m.margins):
        target = torch.maximum(t, margin.view(1, -1, 1))
        keep = (s > target) | (target > 0)
        explicit = explicit + w * ((s - target).pow(2) * keep).sum() / x.shape[0]
    assert torch.allclose(losses.terms["loss_ofd"], 1e-3 * explicit)


def test_ofd_margins_from_the_teachers_batch_norms():
    torch.manual_seed(0)
    teacher = resnet8()
    for mod in teacher.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 2.0)
            mod.bias.data.uniform_(-1.0, 1.0)
    m = OFD(student=resnet8(), teacher=teacher, student_layers=["layer1.0.relu"], input_shape=[3, 16, 16])
    assert m.teacher_bn_layers == ["layer1.0.bn2"]  # the BN of the residual branch, before the add
    assert torch.equal(m.margins[0], ofd_margin_from_bn(teacher.layer1[0].bn2))
    # a block whose shortcut has a BN too (layer2.0: stride 2): ambiguous, so the user says which
    with pytest.raises(KDConfigError, match=r"layer2\.0\.bn2, layer2\.0\.downsample\.1.*teacher_bn_layers"):
        OFD(student=resnet8(), teacher=resnet8(), student_layers=["layer2.0.relu"], input_shape=[3, 16, 16])
    given = OFD(student=resnet8(), teacher=teacher, student_layers=["layer2.0.relu"],
                teacher_bn_layers=["layer2.0.bn2"], input_shape=[3, 16, 16])
    assert torch.equal(given.margins[0], ofd_margin_from_bn(teacher.layer2[0].bn2))
    # WRN: pre-activation blocks, the stage outputs' BN sits at the start of the next stage
    w = OFD(student=wrn_16_1(), teacher=wrn_16_1(),
            student_layers=["layer2.0.relu1", "layer3.0.relu1", "relu"], input_shape=[3, 16, 16])
    assert w.teacher_bn_layers == ["layer2.0.bn1", "layer3.0.bn1", "bn"]


def test_ofd_margins_from_data_are_the_gaussian_margins_of_the_teachers_responses():
    student, teacher = _nets()
    m = OFD(student=student, teacher=teacher, student_layers=LAYERS3, margin_source="data")
    dm = DistillDataModule("mnist1d", batch_size=50, train_subset=100)
    _trainer(limit_train_batches=1).fit(m, dm)
    x, _, _ = dm.train_dataset.get_batch(torch.arange(len(dm.train_dataset)))
    t_pre, _ = _manual_maps(teacher, x)
    for margin, t in zip(m.margins, t_pre):
        flat = t.double().transpose(0, 1).flatten(1)
        expected = ofd_margin(flat.std(1, unbiased=False), flat.mean(1))
        assert torch.allclose(margin, expected, atol=1e-5)
        assert (margin <= 0).all()


def test_reviewkd_terms_and_warmup():
    m = _make(ReviewKD, transfer_weight=5.0, warmup_epochs=20)
    x, y, idx = _batch()
    _, s_post = _manual_maps(m.student, x)
    t_pre, _ = _manual_maps(m.teacher, x)  # the teacher's levels are pre-ReLU
    hcl = hcl_loss(review_chain(s_post, m.abfs, [(19,), (10,), (5,)]), t_pre)
    for epoch, warm in ((0, 1 / 20), (4, 5 / 20), (19, 1.0), (30, 1.0)):
        _at_epoch(m, epoch, max_epochs=40)
        losses = m.compute_losses(x, y, idx)
        assert torch.allclose(losses.terms["loss_review"], 5.0 * warm * hcl, rtol=1e-5)
        assert torch.allclose(losses.logged["loss_hcl"], hcl, rtol=1e-5)
    # a fraction of max_epochs: 0.25 of 40 = 10 warm-up epochs
    m.warmup_epochs = 0.25
    _at_epoch(m, 4, max_epochs=40)
    assert m.warmup_factor() == pytest.approx(0.5)
    m.warmup_epochs = 0
    assert m.warmup_factor() == 1.0


def test_reviewkd_fuses_a_pooled_embedding_as_the_deepest_level():
    m = ReviewKD(student=resnet8(num_classes=10), teacher=resnet8(num_classes=10),
                 student_layers=["layer1", "layer2", "layer3", "fc"],
                 student_pre_activation=[False, False, False, True],
                 teacher_layers=["layer1.0.relu", "layer2.0.relu", "layer3.0.relu", "fc"],
                 input_shape=[3, 16, 16])
    assert [a.fuse for a in m.abfs] == [True, True, True, False]
    assert m.abfs[0].mid_channels == 64  # min(512, channels of the deepest level)
    assert m.out_sizes == [(16, 16), (8, 8), (4, 4), None]
    x = torch.randn(4, 3, 16, 16)
    losses = m.train().compute_losses(x, torch.arange(4), torch.arange(4))
    assert torch.isfinite(losses.terms["loss_review"])


# ---- gradients ------------------------------------------------------------------------------
AUX = {VID: "regressors", FactorTransfer: "translator", CRD: "embed_s", OFD: "connectors", ReviewKD: "abfs"}


@pytest.mark.parametrize("cls", list(CONFIG), ids=lambda c: c.__name__)
def test_gradients_reach_student_and_auxiliary_modules_never_teacher(cls):
    m = _make(cls, **({"stage1_epochs": 1} if cls is FactorTransfer else {}))
    if cls is FactorTransfer:
        _at_epoch(m, 1)  # stage 2
    x, y, idx = _batch()
    loss = m.training_step((x, y, idx), 0)
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters()) and not m.teacher.training
    assert m.student.conv1.weight.grad.abs().sum() > 0
    aux = getattr(m, AUX[cls])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in aux.parameters())
    if cls is CRD:
        assert m.embed_t.linear.weight.grad.abs().sum() > 0  # the teacher's head learns too
    if cls is FactorTransfer:  # the paraphraser is frozen in stage 2
        assert all(p.grad is None for p in m.paraphraser.parameters())
    learnable = {id(p) for p in m.learnable_parameters()}
    assert {id(p) for p in aux.parameters()} <= learnable
    assert not learnable & {id(p) for p in m.teacher.parameters()}


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


class _BankAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.bank = {k: v.clone() for k, v in pl_module.bank.state_dict().items()}
        self.draws = pl_module.negative_draws


def test_crd_bank_survives_checkpoint_and_resume(tmp_path):
    def fit(max_epochs, ckpt=None, callbacks=()):
        student, teacher = _nets()
        m = CRD(student=student, teacher=teacher, num_negatives=512)
        trainer = _trainer(max_epochs=max_epochs, limit_train_batches=2, enable_checkpointing=True,
                           default_root_dir=tmp_path, callbacks=list(callbacks))
        trainer.fit(m, DistillDataModule("mnist1d", batch_size=25, train_subset=100), ckpt_path=ckpt)
        return m, trainer

    with pytest.warns(UserWarning, match=r"num_negatives=512 but each training example has only 90 "
                                         r"candidate negatives \(100 examples in the pool"):
        first, trainer = fit(1)
    assert first.bank.num_data == 4000  # every row of the training source
    assert not torch.isnan(first.bank.log_z).any() and first.negative_draws == 2
    ckpt = trainer.checkpoint_callback.best_model_path
    saved = torch.load(ckpt, weights_only=False)
    assert {"bank.memory_s", "bank.memory_t", "bank.log_z"} <= set(saved["state_dict"])
    assert "bank.pool" not in saved["state_dict"]  # derived from the data, set again at the start
    spy = _BankAtStart()
    resumed, _ = fit(2, ckpt, [spy])
    for key, value in first.bank.state_dict().items():
        assert torch.equal(spy.bank[key], value), key
    assert spy.draws == 2 and resumed.negative_draws == 4
    assert not torch.equal(resumed.bank.memory_s, first.bank.memory_s)  # and it kept learning
    assert torch.equal(resumed.bank.log_z, first.bank.log_z)  # the constants are estimated once


# ---- CLI end to end, bf16 ---------------------------------------------------------------------
@pytest.mark.parametrize("cls", list(CONFIG), ids=lambda c: c.__name__)
def test_cli_bf16_mixed_runs_each_method_with_finite_losses(cls, mnist1d_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stages = ["--model.init_args.stage1_epochs", "1"] if cls is FactorTransfer else []
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d" / CONFIG[cls], *TINY, "--trainer.max_epochs", "2",
                   *stages, "--trainer.precision", "bf16-mixed", "--model.init_args.teacher_checkpoint",
                   mnist1d_teacher, "--data.train_subset", "100", "--data.batch_size", "25"])
    assert isinstance(cli.model, cls) and cli.trainer.precision == "bf16-mixed"
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    assert all(math.isfinite(v) for v in scalars["train/loss"])
    assert all(math.isfinite(v) for v in scalars[f"train/{TERM[cls]}"]) and "train/loss_ce" in scalars
    if stages:
        assert scalars["stage"] == [1.0, 2.0] and "train/loss_rec" in scalars


# ---- bad input --------------------------------------------------------------------------------
BAD = [
    ("vid.yaml", ["--model.init_args.student_layers", "[fc]", "--model.init_args.teacher_layers", "[relu3]"],
     ["VID: student layer 'fc' gives [B, 10] but teacher layer 'relu3' gives [B, 64, 5]", "same kind"]),
    ("vid.yaml", ["--model.init_args.mid_channels", "0"], ["VID: mid_channels must be a positive integer"]),
    ("ft.yaml", ["--model.init_args.teacher_layer", "fc"],
     ["FactorTransfer: student layer 'relu3' gives [B, 64, 5] and teacher layer 'fc' gives [B, 10]",
      "must be feature maps"]),
    ("ft.yaml", ["--model.init_args.paraphrase_rate", "0"], ["paraphrase_rate k must be > 0"]),
    ("ft.yaml", ["--model.init_args.reconstruction_p", "3"], ["reconstruction_p must be 2"]),
    ("crd.yaml", ["--model.init_args.num_negatives", "0"], ["CRD: num_negatives must be a positive integer"]),
    ("crd.yaml", ["--model.init_args.bank_momentum", "1.0"], ["bank_momentum must be in [0, 1)"]),
    ("crd.yaml", ["--model.init_args.nce_temperature", "0"], ["nce_temperature must be > 0"]),
    ("crd.yaml", ["--model.init_args.num_data", "500"],
     ["memory bank has 500 rows (num_data) but the data module's training source has 4000"]),
    ("ofd.yaml", ["--model.init_args.margin_source", "bn"],
     ["no batch norm of the teacher (ConvNet1D) feeds the tensor before teacher layer 'relu1'",
      "margin_source: data"]),
    ("ofd.yaml", ["--model.init_args.margin_source", "mean"], ["margin_source must be 'bn'"]),
    ("ofd.yaml", ["--model.init_args.stage_weights", "[1.0, 1.0]"], ["one weight >= 0 per layer (3)"]),
    ("reviewkd.yaml", ["--model.init_args.warmup_epochs", "-1"], ["ReviewKD: warmup_epochs must be an integer >= 0"]),
    ("reviewkd.yaml", ["--model.init_args.student_pre_activation", "[false, true]"],
     ["student_pre_activation must be one bool or one per layer (3)"]),
    ("reviewkd.yaml", ["--model.init_args.teacher_layers", "[relu1, relu2]"],
     ["ReviewKD needs one teacher layer per student layer"]),
]


@pytest.mark.parametrize("config, extra, messages", BAD, ids=[f"{c[:-5]}-{m[0][:30]}" for c, _, m in BAD])
def test_bad_input_gives_one_paragraph_error(config, extra, messages, mnist1d_teacher, tmp_path,
                                             monkeypatch, capsys):
    assert_mnist1d_config_refused(config, extra, messages, mnist1d_teacher, tmp_path, monkeypatch, capsys)


# ---- DDP ----------------------------------------------------------------------------------------
DUMP_STATE = '''
import hashlib, json, os
from pytorch_lightning import Callback


class DumpState(Callback):
    def on_train_end(self, trainer, pl_module):
        def digest(items):
            h = hashlib.sha1()
            for _, v in sorted(items):
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()
        state = [(k, v) for k, v in pl_module.state_dict().items() if not k.startswith("teacher.")]
        with open(os.path.join(os.getcwd(), f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"world": trainer.world_size, "steps": trainer.global_step,
                       "broadcast_buffers": trainer.strategy.model.broadcast_buffers,
                       "params": digest(pl_module.named_parameters()),
                       "state": digest(state), "keys": sorted(k for k, _ in state),
                       "bank": digest([(k, v) for k, v in state if k.startswith("bank.")])}, f)
'''


def _ddp(config: str, teacher: Path, tmp_path: Path, strategy: str, *extra: str) -> dict:
    (r0, r1), _ = run_ddp(["fit", "--config", CONFIGS / "mnist1d" / config, *TINY,
                           "--trainer.limit_train_batches", "3", "--model.init_args.teacher_checkpoint",
                           teacher, "--data.train_subset", "200", "--data.batch_size", "20",
                           "--test_after_fit", "false", *extra], tmp_path, DUMP_STATE, strategy=strategy,
                          timeout=400)
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"]
    assert r0["params"] == r1["params"]  # identical weights (student and auxiliary modules)
    assert r0["state"] == r1["state"]  # and identical buffers
    return r0


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("cls, strategy, extra", [
    (VID, "ddp", []),
    (FactorTransfer, "ddp_find_unused_parameters_true",
     ["--trainer.max_epochs", "2", "--model.init_args.stage1_epochs", "1"]),
    (OFD, "ddp", []),
    (ReviewKD, "ddp", []),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_ddp_two_cpu_processes_end_identical(cls, strategy, extra, mnist1d_teacher, tmp_path):
    r0 = _ddp(CONFIG[cls], mnist1d_teacher, tmp_path, strategy, *extra)
    assert r0["steps"] == 3 * (2 if cls is FactorTransfer else 1)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_crd_ranks_keep_identical_banks_without_broadcasting_them(mnist1d_teacher, tmp_path):
    """Buffers are not broadcast (broadcast_buffers=False), so equal banks on both ranks come from
    the gathered, identical updates; the weights are equal too."""
    no_broadcast = json.dumps({"class_path": "pytorch_lightning.strategies.DDPStrategy",
                               "init_args": {"broadcast_buffers": False}})
    r0 = _ddp("crd.yaml", mnist1d_teacher, tmp_path, no_broadcast, "--trainer.max_epochs", "2")
    assert r0["broadcast_buffers"] is False
    assert r0["steps"] == 6 and "bank.memory_s" in r0["keys"]
