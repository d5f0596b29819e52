"""SP, PKT, CC, NST, DKD, DIST and logit-standardised KD, the methods whose only trainable network is
the student: each term is its loss function times its weight, gradients reach the student alone,
each config fits through the CLI (fp32 and bf16) and under DDP, bad input is refused."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.losses import (cc_loss, dist_loss, dist_terms, dkd_loss, dkd_terms, nst_loss, pkt_loss,
                                 sp_loss, standardized_kd_loss)
from kd_lightning.methods import (DIST, CorrelationCongruence, DecoupledKD, NeuronSelectivityTransfer,
                                  ProbabilisticKnowledgeTransfer, SimilarityPreserving, StandardizedKD)
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
