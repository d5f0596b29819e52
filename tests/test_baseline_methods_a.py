"""SP, PKT, NST, CC, DKD, DIST and logit-standardised KD as methods: their terms are the loss
functions times their weights, gradients, invariances, the DKD warm-up, the CLI end to end (fp32
and bf16-mixed), bad input, and 2-process DDP."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.losses import (
    cc_loss,
    dist_loss,
    dist_terms,
    dkd_loss,
    dkd_terms,
    kd_loss,
    nst_loss,
    pkt_loss,
    sp_loss,
    standardized_kd_loss,
)
from kd_lightning.methods import (
    DIST,
    CorrelationCongruence,
    DecoupledKD,
    NeuronSelectivityTransfer,
    ProbabilisticKnowledgeTransfer,
    SimilarityPreserving,
    StandardizedKD,
)
from kd_lightning.models import MLP, ConvNet1D, FeatureTaps
from tests.conftest import (CONFIGS, DUMP_WEIGHTS, TINY, assert_mnist1d_config_refused, run_cli, run_ddp,
                            tb_scalars)

FEATURE_METHODS = [SimilarityPreserving, ProbabilisticKnowledgeTransfer, CorrelationCongruence,
                   NeuronSelectivityTransfer]
LOGIT_METHODS = [DecoupledKD, DIST, StandardizedKD]
ALL = FEATURE_METHODS + LOGIT_METHODS
LAYERS = {SimilarityPreserving: {"student_layers": ["relu3"]},
          NeuronSelectivityTransfer: {"student_layers": ["relu1", "relu2", "relu3"]}}
CONFIG = {SimilarityPreserving: "sp.yaml", ProbabilisticKnowledgeTransfer: "pkt.yaml",
          CorrelationCongruence: "cc.yaml", NeuronSelectivityTransfer: "nst.yaml",
          DecoupledKD: "dkd.yaml", DIST: "dist.yaml", StandardizedKD: "standardized_kd.yaml"}
TERMS = {SimilarityPreserving: ["loss_ce", "loss_sp"],
         ProbabilisticKnowledgeTransfer: ["loss_ce", "loss_pkt"],
         CorrelationCongruence: ["loss_ce", "loss_cc"], NeuronSelectivityTransfer: ["loss_ce", "loss_nst"],
         DecoupledKD: ["loss_ce", "loss_tckd", "loss_nckd"], DIST: ["loss_ce", "loss_inter", "loss_intra"],
         StandardizedKD: ["loss_ce", "loss_kd"]}


def name(cls: type) -> str:
    return cls.__name__


def _teacher() -> ConvNet1D:
    torch.manual_seed(1)
    t = ConvNet1D(width=64)
    with torch.no_grad():  # sharper logits than at initialisation, so every term is far from 0
        t.fc.weight.mul_(8.0)
    return t


def _method(cls, student=None, teacher=None, **kw):
    if cls in FEATURE_METHODS:
        kw = {**LAYERS.get(cls, {}), "input_shape": [1, 40], **kw}
    student = ConvNet1D(width=64, groups=4) if student is None else student
    return cls(student=student, teacher=_teacher() if teacher is None else teacher, num_classes=10,
               **kw).train()


def _batch(n: int = 12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n)


def _maps(net: nn.Module, x, layers):
    with FeatureTaps(net, layers) as taps:
        net(x)
        return taps.pop()


# ---- the terms are the loss functions times their weights ----------------------------------
def _expected(m, x, y) -> dict[str, torch.Tensor]:
    """The weighted terms, computed from the networks and the loss functions directly."""
    s, t = m.student, m.teacher
    z_s = s(x)
    with torch.no_grad():
        z_t = t(x)
    out = {"loss_ce": m.ce_weight * F.cross_entropy(z_s, y)}
    if isinstance(m, SimilarityPreserving):
        out["loss_sp"] = m.transfer_weight * sp_loss(_maps(s, x, ["relu3"]), _maps(t, x, ["relu3"]))
    elif isinstance(m, NeuronSelectivityTransfer):
        layers = ["relu1", "relu2", "relu3"]
        out["loss_nst"] = m.transfer_weight * nst_loss(_maps(s, x, layers), _maps(t, x, layers), 3, 0.5)
    elif isinstance(m, ProbabilisticKnowledgeTransfer):  # the embedding is the input of fc
        out["loss_pkt"] = m.transfer_weight * pkt_loss(s.forward_features(x), t.forward_features(x))
    elif isinstance(m, CorrelationCongruence):
        out["loss_cc"] = m.transfer_weight * cc_loss(s.forward_features(x), t.forward_features(x), 0.3, 3)
    elif isinstance(m, DecoupledKD):
        tckd, nckd = dkd_terms(z_s, z_t, y, 3.0)
        out["loss_tckd"], out["loss_nckd"] = 0.5 * 2.0 * tckd, 0.5 * 5.0 * nckd  # w(4) = 5/10
        out["dkd"] = 0.5 * dkd_loss(z_s, z_t, y, alpha=2.0, beta=5.0, temperature=3.0)
    elif isinstance(m, DIST):
        inter, intra = dist_terms(z_s, z_t, 4.0)
        out["loss_inter"], out["loss_intra"] = 2.0 * inter, 3.0 * intra
        out["dist"] = dist_loss(z_s, z_t, beta=2.0, gamma=3.0, temperature=4.0)
    else:
        out["loss_kd"] = 7.0 * standardized_kd_loss(z_s, z_t, 3.0)
    return out


NON_DEFAULT = {  # every weight and kernel parameter away from its default, to catch wiring errors
    SimilarityPreserving: {"transfer_weight": 7.0, "ce_weight": 0.5},
    ProbabilisticKnowledgeTransfer: {"transfer_weight": 7.0, "ce_weight": 0.5},
    CorrelationCongruence: {"transfer_weight": 7.0, "ce_weight": 0.5, "kernel_gamma": 0.3,
                            "taylor_order": 3},
    NeuronSelectivityTransfer: {"transfer_weight": 7.0, "ce_weight": 0.5, "kernel_degree": 3,
                                "kernel_offset": 0.5},
    DecoupledKD: {"target_weight": 2.0, "non_target_weight": 5.0, "temperature": 3.0,
                  "ce_weight": 0.5, "warmup_epochs": 10},
    DIST: {"inter_weight": 2.0, "intra_weight": 3.0, "temperature": 4.0, "ce_weight": 0.5},
    StandardizedKD: {"temperature": 3.0, "ce_weight": 0.5, "kd_weight": 7.0},
}


@pytest.mark.parametrize("cls", ALL, ids=name)
def test_terms_are_the_loss_functions_times_their_weights(cls, monkeypatch):
    monkeypatch.setattr(DecoupledKD, "current_epoch", property(lambda self: 4))
    m = _method(cls, **NON_DEFAULT[cls])
    x, y, idx = _batch()
    logits, terms, _ = m.compute_losses(x, y, idx)
    expected = _expected(m, x, y)
    assert list(terms) == TERMS[cls]
    for key in TERMS[cls]:
        assert expected[key] > 1e-4, key  # a comparison of non-trivial values
        torch.testing.assert_close(terms[key], expected[key], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logits, m.student(x))
    if cls is DecoupledKD:  # the two weighted terms sum to the DKD loss at the warm-up weight
        torch.testing.assert_close(terms["loss_tckd"] + terms["loss_nckd"], expected["dkd"])
    if cls is DIST:
        torch.testing.assert_close(terms["loss_inter"] + terms["loss_intra"], expected["dist"])
    loss = m.training_step((x, y, idx), 0)  # the loss minimised is the sum of the terms
    torch.testing.assert_close(loss, sum(expected[k] for k in TERMS[cls]))


@pytest.mark.parametrize("cls", FEATURE_METHODS, ids=name)
def test_kd_weight_adds_hinton_kd_to_the_feature_methods(cls):
    m = _method(cls, kd_weight=0.9, ce_weight=0.1, temperature=4.0)
    x, y, idx = _batch()
    terms = m.compute_losses(x, y, idx).terms
    with torch.no_grad():
        z_t = m.teacher(x)
    torch.testing.assert_close(terms["loss_kd"], 0.9 * kd_loss(m.student(x), z_t, 4.0))


# ---- what each method ignores, by construction ---------------------------------------------
def test_sp_ignores_a_rescaling_of_the_activations():
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # relu3 of the student = 3 x relu3 of the teacher
        student.conv3.weight.mul_(3.0)
        student.conv3.bias.mul_(3.0)
    terms = _method(SimilarityPreserving, student, teacher).compute_losses(*_batch()).terms
    assert terms["loss_sp"].item() < 1e-9


@pytest.mark.parametrize("cls", [ProbabilisticKnowledgeTransfer, CorrelationCongruence], ids=name)
def test_embedding_methods_ignore_a_rescaling_of_the_embedding(cls):
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.conv3.weight.mul_(2.5)
        student.conv3.bias.mul_(2.5)
    m = _method(cls, student, teacher)
    x, y, idx = _batch()
    torch.testing.assert_close(student.forward_features(x), 2.5 * teacher.forward_features(x))
    assert m.compute_losses(x, y, idx).terms[TERMS[cls][1]].item() < 1e-6


def test_nst_ignores_the_order_of_the_channels():
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        student.conv3.weight.copy_(teacher.conv3.weight[perm])
        student.conv3.bias.copy_(teacher.conv3.bias[perm])
    m = _method(NeuronSelectivityTransfer, student, teacher, student_layers=["relu3"])
    x, y, idx = _batch()
    assert not torch.allclose(_maps(student, x, ["relu3"])[0], _maps(teacher, x, ["relu3"])[0])
    assert m.compute_losses(x, y, idx).terms["loss_nst"].item() < 1e-6


def test_standardized_kd_ignores_scale_and_shift_of_the_logits_where_kd_does_not():
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # student logits = 3 z_t + 5
        student.fc.weight.mul_(3.0)
        student.fc.bias.mul_(3.0).add_(5.0)
    m = _method(StandardizedKD, student, teacher)
    x, y, idx = _batch()
    terms = m.compute_losses(x, y, idx).terms
    assert terms["loss_kd"].item() < 1e-6
    assert kd_loss(student(x), teacher(x), 2.0).item() > 0.1


def test_dist_is_zero_when_the_student_predicts_like_the_teacher():
    teacher = _teacher()
    terms = _method(DIST, copy.deepcopy(teacher), teacher).compute_losses(*_batch()).terms
    assert abs(terms["loss_inter"].item()) < 1e-4 and abs(terms["loss_intra"].item()) < 1e-4
    other = _method(DIST, teacher=teacher).compute_losses(*_batch()).terms  # a different student
    assert other["loss_inter"].item() > 0.01 and other["loss_intra"].item() > 0.01


# ---- the DKD warm-up -------------------------------------------------------------------------
@pytest.mark.parametrize("warmup, weights", [(10, [0.1, 0.5, 1.0, 1.0, 1.0]), (0, [1.0] * 5)])
def test_dkd_warmup_is_linear_in_the_epoch(warmup, weights, monkeypatch):
    epoch = {"e": 0}
    monkeypatch.setattr(DecoupledKD, "current_epoch", property(lambda self: epoch["e"]))
    m = _method(DecoupledKD, warmup_epochs=warmup)
    x, y, idx = _batch()
    tckd, nckd = dkd_terms(m.student(x), m.teacher(x), y, 4.0)
    for e, w in zip([0, 4, 9, 10, 30], weights):
        epoch["e"] = e
        terms = m.compute_losses(x, y, idx).terms
        assert m.warmup_weight == pytest.approx(w)
        torch.testing.assert_close(terms["loss_tckd"], w * 1.0 * tckd)
        torch.testing.assert_close(terms["loss_nckd"], w * 8.0 * nckd)


def test_dkd_warmup_resumes_from_the_checkpoint_epoch(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    def fit(ckpt_path=None, version=0):
        m = _method(DecoupledKD, warmup_epochs=4)
        trainer = pl.Trainer(
            max_epochs=3, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", devices=1,
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
            logger=TensorBoardLogger(tmp_path, name="dkd", version=version),
            callbacks=[ModelCheckpoint(dirpath=tmp_path / f"ckpts{version}", filename="{epoch}",
                                       save_top_k=-1, every_n_epochs=1)])
        trainer.fit(m, DistillDataModule("mnist1d", batch_size=50, train_subset=100),
                    ckpt_path=ckpt_path)
        return tb_scalars(tmp_path / "dkd" / f"version_{version}")

    assert fit()["train/dkd_warmup"] == pytest.approx([0.25, 0.5, 0.75])
    resumed = fit(tmp_path / "ckpts0" / "epoch=0.ckpt", version=1)
    assert resumed["train/dkd_warmup"] == pytest.approx([0.5, 0.75])


def test_dkd_warmup_as_a_fraction_of_max_epochs(monkeypatch):
    epoch = {"e": 0}
    monkeypatch.setattr(DecoupledKD, "current_epoch", property(lambda self: epoch["e"]))
    m = _method(DecoupledKD, warmup_epochs=0.25)
    m.trainer = pl.Trainer(max_epochs=40, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
    for e, w in ((0, 1 / 10), (4, 5 / 10), (9, 1.0), (30, 1.0)):  # 0.25 of 40 = 10 epochs
        epoch["e"] = e
        assert m.warmup_weight == pytest.approx(w)
    m.trainer.fit_loop.max_epochs = 6  # 1.5 epochs, unrounded: the ramp ends within epoch 1
    epoch["e"] = 0
    assert m.warmup_weight == pytest.approx(1 / 1.5)
    m.trainer.fit_loop.max_epochs = -1
    with pytest.raises(KDConfigError, match="warmup_epochs=0.25 is a fraction of trainer.max_epochs"):
        m.warmup_weight


# ---- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL, ids=name)
def test_gradients_reach_the_student_never_the_teacher(cls):
    m = _method(cls)
    loss = m.training_step(_batch(), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert not m.teacher.training
    for p in (m.student.conv1.weight, m.student.conv3.weight, m.student.fc.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    learnable = {id(p) for p in m.learnable_parameters()}
    assert learnable == {id(p) for p in m.student.parameters()}  # no auxiliary modules
    # the student's taps exist only during the step: validation runs the bare student
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.student.modules())


@pytest.mark.parametrize("cls", FEATURE_METHODS, ids=name)
def test_the_transfer_term_alone_trains_the_tapped_layers(cls):
    m = _method(cls, ce_weight=0.0)
    x, y, idx = _batch()
    terms = m.compute_losses(x, y, idx).terms
    terms[TERMS[cls][1]].backward()
    assert m.student.conv1.weight.grad.abs().sum() > 0
    assert m.student.fc.weight.grad is None  # the head is after every tapped layer


# ---- the CLI, end to end -----------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("cls", ALL, ids=name)
def test_cli_fits_and_tests_each_config(cls, precision, mnist1d_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d" / CONFIG[cls], *TINY,
                   "--trainer.precision", precision, "--data.train_subset", "100",
                   "--model.init_args.teacher_checkpoint", mnist1d_teacher])
    assert type(cli.model) is cls and cli.trainer.precision == precision
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    for term in ["loss", *TERMS[cls]]:
        assert all(map(math.isfinite, scalars[f"train/{term}"])), term
    if cls is DecoupledKD:  # the config's 12 warm-up epochs: epoch 0 has weight 1/12
        assert scalars["train/dkd_warmup"] == pytest.approx([1 / 12])


# ---- bad input ---------------------------------------------------------------------------------
BAD_CLI = [
    ("nst.yaml", ["--model.init_args.student_layers", "[relu1, fc]",
                  "--model.init_args.teacher_layers", "[relu1, fc]"],
     ["student layer 'fc' gives [B, 10], teacher layer 'fc' gives [B, 10]", "needs feature maps"]),
    ("pkt.yaml", ["--model.init_args.student_layer", "relu9"],
     ["ConvNet1D has no module 'relu9'", "Nearest module names"]),
    ("cc.yaml", ["--model.init_args.teacher_layer", "relu3"],
     ["student's default embedding is the input of its classifier", "teacher layer 'relu3'",
      "set layer_input: true"]),
    ("dkd.yaml", ["--model.init_args.non_target_weight", "-8"], ["non_target_weight must be >= 0"]),
]


@pytest.mark.parametrize("config, extra, messages", BAD_CLI,
                         ids=[f"{c[:-5]}-{e[0].rsplit('.', 1)[-1]}" for c, e, _ in BAD_CLI])
def test_bad_input_gives_one_paragraph_error_in_the_cli(config, extra, messages, mnist1d_teacher,
                                                        tmp_path, monkeypatch, capsys):
    assert_mnist1d_config_refused(config, extra, messages, mnist1d_teacher, tmp_path, monkeypatch, capsys)


BAD_ARGS = [
    (SimilarityPreserving, {"student_layers": ["relu2", "relu3"], "teacher_layers": ["relu3"]},
     "needs one teacher layer per student layer"),
    (SimilarityPreserving, {"transfer_weight": -1.0}, "transfer_weight must be >= 0"),
    (NeuronSelectivityTransfer, {"kernel_degree": 0}, "kernel_degree must be an integer >= 1"),
    (NeuronSelectivityTransfer, {"kernel_degree": 1.5}, "kernel_degree must be an integer >= 1"),
    (NeuronSelectivityTransfer, {"kernel_offset": -1.0}, "kernel_offset must be >= 0"),
    (NeuronSelectivityTransfer, {"student_layers": ["relu1"], "teacher_layers": ["relu1"],
                                 "student": MLP()}, "needs feature maps"),
    (CorrelationCongruence, {"taylor_order": 0}, "taylor_order must be an integer >= 1"),
    (CorrelationCongruence, {"kernel_gamma": 0.0}, "kernel_gamma must be a finite number > 0"),
    (ProbabilisticKnowledgeTransfer, {"ce_weight": -1.0}, "ce_weight must be >= 0"),
    (DecoupledKD, {"warmup_epochs": -1}, "warmup_epochs must be an integer >= 0"),
    (DecoupledKD, {"warmup_epochs": 1.5}, "warmup_epochs=1.5 is a float, which means a fraction of max_epochs"),
    (DecoupledKD, {"target_weight": -1.0}, "target_weight must be >= 0"),
    (DecoupledKD, {"temperature": 0.0}, "temperature must be > 0"),
    (DIST, {"intra_weight": -1.0}, "intra_weight must be >= 0"),
    (DIST, {"temperature": -4.0}, "temperature must be > 0"),
    (StandardizedKD, {"kd_weight": -9.0}, "kd_weight must be >= 0"),
]


@pytest.mark.parametrize("cls, kw, message", BAD_ARGS,
                         ids=[f"{c.__name__}-{next(iter(kw))}" for c, kw, _ in BAD_ARGS])
def test_invalid_hyperparameters_and_layers_are_refused(cls, kw, message):
    with pytest.raises(KDConfigError, match=rf"^{cls.__name__}\b.*{re.escape(message)}"):
        _method(cls, **kw)


@pytest.mark.parametrize("cls", [ProbabilisticKnowledgeTransfer, CorrelationCongruence], ids=name)
def test_embedding_methods_need_a_classifier_or_an_explicit_layer(cls):
    headless = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten())
    with pytest.raises(KDConfigError, match=rf"^{cls.__name__}: the student \(Sequential\) has no "
                                            r"nn.Linear classifier.*student_layer"):
        cls(student=headless, teacher=ConvNet1D(width=64), input_shape=[1, 40])
    m = cls(student=headless, teacher=ConvNet1D(width=64), input_shape=[1, 40], student_layer="1",
            teacher_layer="relu3")  # explicit layers, both tapped at their outputs
    assert m.compute_losses(*_batch()).terms[TERMS[cls][1]] >= 0


# ---- DDP -----------------------------------------------------------------------------------
@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("cls", ALL, ids=name)
def test_ddp_two_cpu_processes_end_with_identical_students(cls, mnist1d_teacher, tmp_path):
    """2-process CPU DDP: the gradients of every term (the relation terms computed within each
    rank's share of the batch) are all-reduced, so both ranks end with the same student."""
    (r0, r1), _ = run_ddp(["fit", "--config", CONFIGS / "mnist1d" / CONFIG[cls], *TINY,
                           "--model.init_args.teacher_checkpoint", mnist1d_teacher,
                           "--data.train_subset", "400", "--data.batch_size", "50",
                           "--data.batches_per_step", "2", "--test_after_fit", "false",
                           "--trainer.limit_val_batches", "0"], tmp_path, DUMP_WEIGHTS)
    assert r0["step"] == r1["step"] == 4  # 2 groups x 2 minibatches per rank
    assert r0["weights"] == r1["weights"]
