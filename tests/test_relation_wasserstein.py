"""RelationKD (Park et al. 2019) and WassersteinKD (Kong et al. 2020, seed 004): losses, methods, CLI."""

from __future__ import annotations

import importlib

import itertools
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.losses import (
    input_gradient_norm,
    kd_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    wasserstein_kd_loss,
)
from kd_lightning.methods import NonFiniteGradientError, RelationKD, ResponseKD, WassersteinKD
from kd_lightning.models import MLP, ConvNet1D, LeNet5, LeNet5Half, TorchvisionModel, resnet8
from tests.conftest import CONFIGS, TINY, run_cli, run_cli_error, run_ddp, tb_scalars, write_mnist_idx

F64 = torch.float64


# ---- RKD: hand-computed values -------------------------------------------------------------
def _huber(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def _dist(a, b) -> float:
    return math.hypot(*(u - v for u, v in zip(a, b)))


def _hand_distance_loss(s, t) -> float:
    n = len(s)

    def psi(e):
        d = [[_dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        nonzero = [v for row in d for v in row if v > 0]
        mu = sum(nonzero) / len(nonzero)
        return [[v / mu for v in row] for row in d]

    ps, pt = psi(s), psi(t)
    return sum(_huber(ps[i][j] - pt[i][j]) for i in range(n) for j in range(n)) / n**2


def _hand_angle_loss(s, t) -> float:
    n = len(s)

    def cos(e, i, j, k):  # angle at vertex j between e_i and e_k
        u = [a - b for a, b in zip(e[i], e[j])]
        v = [a - b for a, b in zip(e[k], e[j])]
        nu, nv = math.hypot(*u), math.hypot(*v)
        if nu == 0 or nv == 0:
            return 0.0
        return sum(a * b for a, b in zip(u, v)) / (nu * nv)

    return sum(_huber(cos(s, i, j, k) - cos(t, i, j, k))
               for i, j, k in itertools.product(range(n), repeat=3)) / n**3


S3 = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]  # a 3-4-5 right triangle
T3 = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]  # a right isosceles triangle


def test_rkd_distance_matches_hand_computed_value():
    # student distances 3, 4, 5 (mean 4) -> 0.75, 1, 1.25; teacher 1, 1, sqrt2 over (2 + sqrt2)/3
    mu_t = (2 + math.sqrt(2)) / 3
    by_hand = 2 * (_huber(0.75 - 1 / mu_t) + _huber(1.25 - 1 / mu_t) + _huber(1 - math.sqrt(2) / mu_t)) / 9
    assert by_hand == pytest.approx(_hand_distance_loss(S3, T3), rel=1e-12)
    assert by_hand == pytest.approx(0.0237013, abs=1e-7)
    got = rkd_distance_loss(torch.tensor(S3), torch.tensor(T3))
    assert got.item() == pytest.approx(by_hand, rel=1e-5)


def test_rkd_angle_matches_hand_computed_value():
    got = rkd_angle_loss(torch.tensor(S3), torch.tensor(T3))
    assert got.item() == pytest.approx(_hand_angle_loss(S3, T3), rel=1e-5)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 7, generator=g)  # widths may differ
    assert rkd_angle_loss(s, t).item() == pytest.approx(_hand_angle_loss(s.tolist(), t.tolist()), rel=1e-5)
    assert rkd_distance_loss(s, t).item() == pytest.approx(_hand_distance_loss(s.tolist(), t.tolist()),
                                                           rel=1e-5)


def test_rkd_total_weights_and_invariances():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 8, generator=g)
    total, d, a = rkd_loss(s, t)  # defaults w_d = 25, w_a = 50
    assert total.item() == pytest.approx(25 * d.item() + 50 * a.item(), rel=1e-6)
    assert d.item() > 0 and a.item() > 0
    # relations are invariant to scale, rotation and translation of an embedding
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    moved = 3.7 * t @ q + 5.0
    for term in rkd_loss(moved, t):
        assert term.item() == pytest.approx(0.0, abs=1e-5)
    _, d0, a0 = rkd_loss(s, t, w_d=0.0, w_a=50.0)
    assert d0.item() == 0.0 and a0.item() == pytest.approx(a.item())


@pytest.mark.parametrize("loss", [rkd_distance_loss, rkd_angle_loss, lambda s, t: rkd_loss(s, t)[0]],
                         ids=["distance", "angle", "total"])
def test_rkd_gradient_matches_finite_differences(loss):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 3, dtype=F64, generator=g, requires_grad=True)
    t = torch.randn(6, 5, dtype=F64, generator=g, requires_grad=True)
    assert gradcheck(lambda s_: loss(s_, t), (s,), eps=1e-6, atol=1e-6)
    loss(s, t).backward()
    assert t.grad is None  # the teacher side gets no gradient


def test_rkd_bad_inputs_explain_the_fix():
    with pytest.raises(KDConfigError, match="at least 2 examples per batch.*pairs.*triplets"):
        rkd_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(KDConfigError, match="student embedding has 5 rows and the teacher embedding 4"):
        rkd_loss(torch.randn(5, 4), torch.randn(4, 4))


# ---- Wasserstein term ----------------------------------------------------------------------
def _kd64(zs: torch.Tensor, zt: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Per-example T^2 KL(softmax(zt/T) || softmax(zs/T)), kept in float64 for the checks."""
    log_ps, log_pt = F.log_softmax(zs / temperature, -1), F.log_softmax(zt / temperature, -1)
    return temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def _tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x, zt = torch.randn(6, 4, dtype=F64), torch.randn(6, 3, dtype=F64)
    names = [n for n, _ in net.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())
    return net, x, zt, names, params


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_wasserstein_penalty_gradient_matches_finite_differences(p):
    net, x, zt, names, params = _tiny()

    def objective(*ps, eps=0.7, which=0):
        xi = x.clone().requires_grad_(True)
        per = _kd64(functional_call(net, dict(zip(names, ps)), (xi,)), zt)
        return wasserstein_kd_loss(per, xi, eps, p)[which]

    # the penalty alone (mean ||grad_x l||) and L_W: analytic gradients need double backprop
    assert gradcheck(lambda *ps: objective(*ps, which=2), params, eps=1e-6, atol=1e-6)
    assert gradcheck(lambda *ps: objective(*ps, which=0), params, eps=1e-6, atol=1e-6)
    grads = torch.autograd.grad(objective(*params, which=2), params)
    assert all(gr.abs().sum() > 0 for gr in grads)  # the penalty really depends on the weights


def test_input_gradient_norm_is_per_example_and_only_differentiable_with_create_graph():
    net, x, zt, names, params = _tiny()
    xi = x.clone().requires_grad_(True)
    per = _kd64(net(xi), zt)
    norms = input_gradient_norm(per, xi)
    for i in range(len(x)):  # one backward of the sum gives every example's own gradient
        (gi,) = torch.autograd.grad(per[i], xi, retain_graph=True)
        assert norms[i].item() == pytest.approx(gi[i].norm().item(), rel=1e-10)
        assert gi[[j for j in range(len(x)) if j != i]].abs().max() == 0
    assert norms.requires_grad
    assert not input_gradient_norm(per, xi, create_graph=False).requires_grad
    inf_norm = input_gradient_norm(per, xi, p=math.inf)
    assert torch.all(inf_norm <= norms + 1e-12)


def test_wasserstein_penalty_is_zero_when_eps_is_zero():
    net, x, zt, names, params = _tiny()
    xi = x.clone().requires_grad_(True)
    per = _kd64(functional_call(net, dict(zip(names, params)), (xi,)), zt)
    total, fit, grad_norm = wasserstein_kd_loss(per, xi, eps=0.0)
    assert total.item() == fit.item() and grad_norm.item() > 0 and not grad_norm.requires_grad
    g_total = torch.autograd.grad(total, params, retain_graph=True)
    g_fit = torch.autograd.grad(per.mean(), params)
    for a, b in zip(g_total, g_fit):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="eps"):
        wasserstein_kd_loss(per, xi, eps=-0.1)


def _wkd(eps: float, **kw) -> WassersteinKD:
    torch.manual_seed(0)
    teacher = MLP(input_dim=40, hidden_dims=[16], num_classes=10)
    torch.manual_seed(1)
    student = MLP(input_dim=40, hidden_dims=[12], num_classes=10)
    # the student-only variant with a label term, whose eps = 0 limit is ResponseKD(0.1, 0.9)
    kw = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "penalty_through_teacher": False, **kw}
    return WassersteinKD(student=student, teacher=teacher, eps=eps, num_classes=10, **kw)


def test_wasserstein_kd_default_is_eq2_through_both_networks():
    """By default (Kong et al.'s Eq. 2): no CE, T = 1, and the penalty differentiates
    l(o_S(x), o_T(x)) through the teacher too (its weights get no gradient)."""
    torch.manual_seed(0)
    teacher = MLP(input_dim=40, hidden_dims=[16], num_classes=10)
    torch.manual_seed(1)
    student = MLP(input_dim=40, hidden_dims=[12], num_classes=10)
    m = WassersteinKD(student=student, teacher=teacher, eps=0.5, num_classes=10)
    assert (m.temperature, m.ce_weight, m.kd_weight, m.teacher_cache) == (1.0, 0.0, 1.0, False)
    x, y, idx = _batch()
    _, terms, logged = m.compute_losses(x, y, idx)
    assert set(terms) == {"loss_w"}
    xx = x.clone().requires_grad_(True)
    per = kd_loss(student(xx), teacher(xx), 1.0, reduction="none", detach_teacher=False)
    gx = torch.autograd.grad(per.sum(), xx)[0]
    assert torch.allclose(logged["grad_norm"], gx.flatten(1).norm(dim=1).mean(), rtol=1e-5)
    only_student = _wkd(0.5, temperature=1.0, ce_weight=0.0, kd_weight=1.0)
    _, _, logged_s = only_student.compute_losses(x, y, idx)
    assert not torch.allclose(logged["grad_norm"], logged_s["grad_norm"], rtol=1e-2)
    terms["loss_w"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def _batch(n: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 1, 40, generator=g) if dtype.is_floating_point else \
        torch.randint(0, 7, (n, 1, 40), generator=g, dtype=dtype)
    return x, torch.arange(n) % 10, torch.arange(n)


def test_wasserstein_kd_with_eps_zero_is_response_kd():
    batch = _batch()
    w = _wkd(0.0)
    r = ResponseKD(student=w.student, teacher=w.teacher, temperature=4.0, ce_weight=0.1, kd_weight=0.9, num_classes=10)
    lw, lr = w.training_step(batch, 0), r.training_step(batch, 0)
    assert lw.item() == pytest.approx(lr.item(), rel=1e-6)
    gw = torch.autograd.grad(lw, list(w.student.parameters()))
    gr = torch.autograd.grad(lr, list(r.student.parameters()))
    for a, b in zip(gw, gr):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_wasserstein_kd_step_trains_through_the_input_gradient():
    """The method's parameter gradient = that of eps=0 + kd_weight * eps * d/dtheta mean||grad_x l||,
    the last term computed independently with torch.func (grad of grad)."""
    eps = 0.5
    batch = _batch()
    x, _, idx = batch
    m0, m1 = _wkd(0.0), _wkd(eps)
    params = list(m1.student.parameters())
    g1 = torch.autograd.grad(m1.training_step(batch, 0), params)
    g0 = torch.autograd.grad(m0.training_step(batch, 0), list(m0.student.parameters()))
    z_t = m1.teacher_logits(x, idx)
    names = [n for n, _ in m1.student.named_parameters()]

    def penalty(ps):
        def summed(xx):
            return kd_loss(functional_call(m1.student, ps, (xx,)), z_t, 4.0, reduction="none").sum()
        gx = torch.func.grad(summed)(x)
        return gx.flatten(1).norm(dim=1).mean()

    dp = torch.func.grad(penalty)({n: p.detach() for n, p in zip(names, params)})
    for name, a, b in zip(names, g1, g0):
        expected = b + 0.9 * eps * dp[name]
        assert torch.allclose(a, expected, rtol=1e-4, atol=1e-6), name
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(g1, g0))


def test_integer_inputs_are_converted_and_the_batch_is_untouched():
    m = _wkd(0.3)
    x, y, idx = _batch(dtype=torch.int64)
    before = x.clone()
    loss = m.training_step((x, y, idx), 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert x.dtype == torch.int64 and torch.equal(x, before) and not x.requires_grad and x.grad is None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.student.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())
    xf = before.float()
    m.training_step((xf, y, idx), 0).backward()
    assert not xf.requires_grad and xf.grad is None  # float batches too


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


@pytest.mark.parametrize("batched", [True, False])
def test_training_leaves_the_data_set_unchanged(batched):
    dm = DistillDataModule("mnist1d", batch_size=50, train_subset=100, batched=batched)
    splits = dm.splits()
    before = splits.x_train.clone()
    model = _wkd(1.0, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    _trainer(max_steps=4, max_epochs=-1).fit(model, dm)
    assert model.global_step == 4
    assert torch.equal(splits.x_train, before)
    assert dm.train_dataset.x is splits.x_train
    assert not splits.x_train.requires_grad and splits.x_train.grad is None


def test_wasserstein_bad_arguments():
    for kw, msg in [({"eps": -0.1}, "eps must be >= 0"), ({"norm_p": 0.5}, "norm_p must be >= 1"),
                    ({"temperature": 0.0}, "temperature must be > 0"),
                    ({"ce_weight": -1.0}, "ce_weight must be >= 0")]:
        with pytest.raises(KDConfigError, match=msg):
            _wkd(**{"eps": 0.1, **kw})
    with pytest.raises(KDConfigError, match="no teacher was given"):
        WassersteinKD(student=MLP())


def test_wasserstein_non_finite_gradient_is_named():
    m = _wkd(0.1)
    x, y, idx = _batch()
    x[2, 0, 5] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"term 'grad_norm'.*is nan at global step 0"):
        m.training_step((x, y, idx), 0)


# ---- RelationKD method ---------------------------------------------------------------------
def _rkd(**kw) -> RelationKD:
    torch.manual_seed(0)
    return RelationKD(student=MLP(), teacher=ConvNet1D(width=8), num_classes=10, **kw)


def test_relation_kd_default_embedding_is_the_penultimate_feature():
    m = _rkd()
    x = torch.randn(5, 1, 40)
    for net, taps in ((m.student, m.student_taps), (m.teacher, m.teacher_taps)):
        assert taps.layers == ["fc"]
        net(x)
        (emb,) = taps.pop()
        assert torch.equal(emb, net.forward_features(x))
    for net in (resnet8(num_classes=10), LeNet5(), TorchvisionModel("resnet18", num_classes=10)):
        tm = RelationKD(student=LeNet5Half(), teacher=net, num_classes=10)
        assert tm.teacher_taps.layers[0] in ("fc", "model.fc")
    explicit = _rkd(student_layer="relu1", teacher_layer="conv3")
    assert explicit.student_taps.layers == ["relu1"] and explicit.teacher_taps.pre_activation == [False]


def test_relation_kd_step_composes_its_terms_and_trains_the_student_only():
    m = _rkd(kd_weight=0.5)
    x, y, idx = _batch(6)
    loss = m.training_step((x, y, idx), 0)
    with torch.no_grad():
        s, t = m.student.forward_features(x), m.teacher.forward_features(x)
        _, d, a = rkd_loss(s, t)
        ce = F.cross_entropy(m.student(x), y)
        kd = kd_loss(m.student(x), m.teacher(x), 4.0)
    assert loss.item() == pytest.approx((ce + 25 * d + 50 * a + 0.5 * kd).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in m.student.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())
    assert set(m.term_log.names) == {"loss", "loss_ce", "loss_rkd", "loss_rkd_d", "loss_rkd_a", "loss_kd"}
    assert "train/acc" in m.term_log.means()  # training accuracy is logged too


def test_relation_kd_bad_arguments_and_batches():
    with pytest.raises(KDConfigError, match="distance_weight must be >= 0"):
        _rkd(distance_weight=-1.0)
    with pytest.raises(KDConfigError, match="both 0"):
        _rkd(distance_weight=0.0, angle_weight=0.0)
    with pytest.raises(KDConfigError, match="no module 'fc9'. Nearest module names: fc"):
        _rkd(student_layer="fc9")
    with pytest.raises(KDConfigError, match="no nn.Linear classifier"):
        RelationKD(student=MLP(), teacher=nn.Sequential(nn.Flatten(), nn.Identity()), num_classes=10)
    x, y, idx = _batch(1)
    with pytest.raises(KDConfigError, match="at least 2 examples per batch"):
        _rkd().training_step((x, y, idx), 0)


# ---- through the CLI -----------------------------------------------------------------------


def _args(config: str, teacher: Path, *extra) -> list:
    return ["fit", "--config", CONFIGS / config, *TINY, "--model.init_args.teacher_checkpoint", teacher,
            *extra]


TERMS = {"mnist1d/wasserstein.yaml": ["loss", "loss_kd", "loss_w", "grad_norm"],
         "mnist1d/relation.yaml": ["loss", "loss_ce", "loss_rkd_d", "loss_rkd_a"]}


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("config", list(TERMS))
def test_cli_runs_log_every_term(config, precision, mnist1d_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(_args(config, mnist1d_teacher, "--trainer.precision", precision,
                        "--trainer.max_epochs", "2"))
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    for term in TERMS[config]:
        values = scalars[f"train/{term}"]
        assert values and all(map(math.isfinite, values)), term
    if "wasserstein" in config:
        assert all(v > 0 for v in scalars["train/grad_norm"])
    assert 0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1


def test_cli_bad_eps_is_one_paragraph(mnist1d_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = run_cli_error(_args("mnist1d/wasserstein.yaml", mnist1d_teacher, "--model.init_args.eps", "-1"),
                        capsys)
    assert "eps must be >= 0, got -1.0" in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_cli_rkd_batch_of_one_is_explained(mnist1d_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = run_cli_error(_args("mnist1d/relation.yaml", mnist1d_teacher, "--data.batch_size", "1"), capsys)
    assert "at least 2 examples per batch" in err and "a batch of 1 has none" in err


POISON = '''
import torch
from pytorch_lightning import Callback


class Poison(Callback):
    """Makes the student's first layer nan just before global step 5 (epoch 2, batch 1)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:
            with torch.no_grad():
                pl_module.student.fc1.weight.fill_(float("nan"))
'''


def test_cli_non_finite_input_gradient_stops_and_keeps_last_good_checkpoint(
        mnist1d_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "poison_cb.py").write_text(POISON)
    monkeypatch.syspath_prepend(str(tmp_path))
    err = run_cli_error(_args("mnist1d/wasserstein.yaml", mnist1d_teacher, "--trainer.max_epochs", "4",
                              "--trainer.callbacks+=poison_cb.Poison"), capsys)
    assert "term 'grad_norm'" in err and "global step 5 (epoch 2)" in err
    assert "last good checkpoint is kept" in err
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts  # the checkpoints of epochs 1-2 are there ...
    for path in ckpts:  # ... and none was written from the nan step or after it
        ckpt = torch.load(path, weights_only=False)
        assert ckpt["global_step"] <= 4
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


FASHION = sorted((CONFIGS / "fashion_mnist").glob("*.yaml"))


@pytest.mark.parametrize("config", FASHION, ids=[p.name for p in FASHION])
def test_fashion_mnist_configs_fit_end_to_end(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_mnist_idx(tmp_path / "data", "FashionMNIST", n_train=300, n_test=40)
    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    extra = []
    if init.get("teacher_checkpoint"):
        module, name = init["teacher"]["class_path"].rsplit(".", 1)
        teacher = getattr(importlib.import_module(module), name)(**init["teacher"].get("init_args", {}))
        torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
        extra = ["--model.init_args.teacher_checkpoint", tmp_path / "teacher.pt"]
    cli = run_cli(["fit", "--config", config, *TINY, "--data.batch_size", "8",
                   "--data.eval_batch_size", "16", *extra])
    assert 0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    assert all(map(math.isfinite, scalars["train/loss"])) and "val/acc" in scalars


# ---- DDP: two CPU processes, through the console script --------------------------------------
HASH_CALLBACK = '''
import hashlib, json, os
import torch
from pytorch_lightning import Callback


class DumpWeights(Callback):
    def on_train_end(self, trainer, pl_module):
        h = hashlib.sha1()
        for v in pl_module.student.state_dict().values():
            h.update(v.detach().cpu().numpy().tobytes())
        with open(os.path.join(os.getcwd(), f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"world": trainer.world_size, "student": h.hexdigest(),
                       "steps": trainer.global_step}, f)
'''


def _ddp_run(config: str, teacher: Path, tmp_path: Path) -> None:
    (r0, r1), out = run_ddp(_args(config, teacher, "--data.train_subset", "200",
                                  "--trainer.limit_train_batches", "3", "--data.batch_size", "20"),
                            tmp_path, HASH_CALLBACK, timeout=240)
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 3
    assert r0["student"] == r1["student"]  # the (double-backprop) gradients were all-reduced
    assert "test/acc" in out.stdout


@pytest.mark.ddp
def test_ddp_two_cpu_processes_wasserstein(mnist1d_teacher, tmp_path):
    _ddp_run("mnist1d/wasserstein.yaml", mnist1d_teacher, tmp_path)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_cpu_processes_relation(mnist1d_teacher, tmp_path):
    _ddp_run("mnist1d/relation.yaml", mnist1d_teacher, tmp_path)


def test_rkd_angles_from_the_gram_matrix_equal_the_normalised_difference_form():
    from kd_lightning.losses.relation import _angles, _distances

    torch.manual_seed(0)
    e = torch.randn(12, 7) * 3 + 5  # offset: the Gram identities cancel large terms
    e[5] = e[2]  # a duplicate example: zero differences give cosine 0
    diff = torch.nn.functional.normalize(e.double().unsqueeze(0) - e.double().unsqueeze(1), p=2, dim=2)
    explicit = torch.bmm(diff, diff.transpose(1, 2))
    angles = _angles(_distances(e))
    assert angles.dtype == torch.float64  # computed in float64 for float32 embeddings
    assert torch.allclose(angles, explicit, atol=1e-12)


def test_rkd_is_computed_in_float32_under_bf16_autocast():
    from kd_lightning.losses import pairwise_distances

    torch.manual_seed(0)
    s, t = torch.randn(16, 32) * 2 + 10, torch.randn(16, 20) + 3
    ref_total, ref_d, ref_a = rkd_loss(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, d, a = rkd_loss(s, t)
        dist = pairwise_distances(s)
    assert dist.dtype == torch.float32 and torch.allclose(dist, pairwise_distances(s), atol=1e-5)
    assert torch.allclose(d, ref_d, rtol=1e-5) and torch.allclose(a, ref_a, rtol=1e-5)
