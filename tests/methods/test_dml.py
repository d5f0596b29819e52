"""Deep mutual learning (Zhang et al. 2018) as a method: the per-peer update, checkpoints, the CLI.
(Its loss: tests/losses/test_online.py.)"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.losses import deep_mutual_learning_loss
from kd_lightning.methods import DeepMutualLearning
from kd_lightning.models import MLP
from tests.conftest import CONFIGS, TINY, run_cli, run_cli_error, run_ddp


def _mlp(width: int = 16) -> nn.Module:
    return MLP(input_dim=40, hidden_dims=[width], num_classes=10)


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1,
                    default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kwargs})


# ---- the method ---------------------------------------------------------------------------------
def test_bad_configurations_are_refused():
    with pytest.raises(KDConfigError, match="at least two peers"):
        DeepMutualLearning(peers=[_mlp()])
    with pytest.raises(KDConfigError, match="no frozen teacher"):
        DeepMutualLearning(peers=[_mlp(), _mlp()], teacher=_mlp())
    with pytest.raises(KDConfigError, match="peer 0"):
        DeepMutualLearning(peers=[_mlp(), _mlp()], student=_mlp())
    same = _mlp()
    with pytest.raises(KDConfigError, match="twice"):
        DeepMutualLearning(peers=[same, same])
    with pytest.raises(KDConfigError, match="temperature"):
        DeepMutualLearning(peers=[_mlp(), _mlp()], temperature=0)


def test_a_peer_with_the_wrong_number_of_classes_is_reported(tmp_path):
    model = DeepMutualLearning(peers=[_mlp(), MLP(input_dim=40, hidden_dims=[8], num_classes=3)])
    with pytest.raises(KDConfigError, match="peer 1"):
        _trainer(tmp_path, max_steps=1).fit(model, DistillDataModule("mnist1d", train_subset=100))


def test_alternating_update_is_algorithm_1(tmp_path):
    """One minibatch with SGD: peer 0 steps against peer 1's prediction, then peer 1 against
    peer 0's prediction after that step (one step each), as Zhang et al.'s Algorithm 1."""
    torch.manual_seed(0)
    lr = 0.5
    dm = DistillDataModule("mnist1d", train_subset=100, batch_size=100)
    peers = [_mlp(), _mlp(12)]
    before = [{k: v.clone() for k, v in p.state_dict().items()} for p in peers]
    model = DeepMutualLearning(peers=peers, optimizer=lambda ps: torch.optim.SGD(ps, lr=lr))
    _trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, dm)
    assert model.trainer.global_step == 1  # one minibatch; only peer 0's step is counted

    # one minibatch holds the whole 100-example subset; its mean loss does not depend on the order
    x, y, _ = dm.train_dataset.get_batch(torch.arange(len(dm.train_dataset)))
    ref = [_mlp(), _mlp(12)]
    for r, b in zip(ref, before):
        r.load_state_dict(b)

    def sgd(net, loss):
        grads = torch.autograd.grad(loss, list(net.parameters()))
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads):
                p -= lr * g

    z1 = ref[1](x).detach()
    sgd(ref[0], deep_mutual_learning_loss(ref[0](x), [z1], y)[0])
    z0_after = ref[0](x).detach()
    sgd(ref[1], deep_mutual_learning_loss(ref[1](x), [z0_after], y)[0])
    for trained, expected in zip(model.peers, ref):
        for a, b in zip(trained.parameters(), expected.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_one_optimizer_step_per_peer_per_minibatch(tmp_path):
    model = DeepMutualLearning(peers=[_mlp(), _mlp(), _mlp(8)])
    dm = DistillDataModule("mnist1d", train_subset=200, batch_size=50, batches_per_step=2)
    _trainer(tmp_path, max_epochs=1).fit(model, dm)  # 4 minibatches in 2 Lightning steps
    assert model.trainer.global_step == 4
    optimizers = model.trainer.optimizers
    assert len(optimizers) == 3
    for opt, peer in zip(optimizers, model.peers):
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in peer.parameters()}
        assert all(int(opt.state[p]["step"]) == 4 for p in peer.parameters())


def test_every_peer_and_optimizer_is_saved_restored_and_resumed(tmp_path):
    torch.manual_seed(0)
    dm = lambda: DistillDataModule("mnist1d", train_subset=200, batch_size=50)  # noqa: E731
    model = DeepMutualLearning(peers=[_mlp(), _mlp(8)])
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(model, dm())
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert len(state["optimizer_states"]) == 2
    assert any(k.startswith("peers.1.") for k in state["state_dict"])

    restored = DeepMutualLearning.load_from_checkpoint(ckpt, peers=[_mlp(), _mlp(8)])
    for a, b in zip(model.peers, restored.peers):
        for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), name

    resumed = DeepMutualLearning(peers=[_mlp(), _mlp(8)])
    trainer2 = _trainer(tmp_path, max_epochs=2)
    trainer2.fit(resumed, dm(), ckpt_path=ckpt)
    assert trainer2.global_step == 8
    for opt, peer in zip(trainer2.optimizers, resumed.peers):
        assert all(int(opt.state[p]["step"]) == 8 for p in peer.parameters())  # continued at 4
    for a, b in zip(model.peers, resumed.peers):  # every peer trained on from the checkpoint
        assert not torch.equal(next(a.parameters()), next(b.parameters()))


@pytest.mark.parametrize("config", ["dml", "dml_teacher_student"])
def test_configs_run_from_the_cli_and_test_every_peer(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d" / f"{config}.yaml", *TINY,
                   "--data.root", tmp_path / "data"])
    metrics = cli.trainer.callback_metrics
    for key in ("test/acc", "test/acc_peer0", "test/acc_peer1", "test/acc_ensemble"):
        assert key in metrics, key
    assert metrics["test/acc"] == metrics["test/acc_peer0"]
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)
    assert len(ckpt["optimizer_states"]) == 2


def test_bf16_mixed_trains_every_peer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d" / "dml.yaml", *TINY, "--trainer.precision",
                   "bf16-mixed", "--test_after_fit", "false"])
    model = cli.model
    assert model.trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(float(cli.trainer.callback_metrics["val/acc_ensemble"]))


def test_plain_ddp_is_refused_with_the_strategy_to_use(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = run_cli_error(["fit", "--config", CONFIGS / "mnist1d" / "dml.yaml", *TINY,
                         "--trainer.strategy", "ddp", "--trainer.devices", "1"], capsys)
    assert "ddp_find_unused_parameters_true" in err


DUMP_PEERS = '''
import json
from pytorch_lightning import Callback

class DumpPeers(Callback):
    def on_train_end(self, trainer, m):
        with open(f"rank{trainer.global_rank}.json", "w") as f:
            json.dump({"peers": [p.fc.weight.tolist() for p in m.peers], "step": trainer.global_step}, f)
'''


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_keeps_every_peer_identical_on_every_process(tmp_path):
    (r0, r1), _ = run_ddp(["fit", "--config", CONFIGS / "mnist1d/dml.yaml", *TINY,
                           "--trainer.limit_train_batches", "3", "--test_after_fit", "false"], tmp_path,
                          DUMP_PEERS, strategy="ddp_find_unused_parameters_true")
    assert r0 == r1 and r0["step"] == 3
    assert r0["peers"][0] != r0["peers"][1]


def test_every_peer_follows_the_configured_schedule(tmp_path):
    model = DeepMutualLearning(
        peers=[_mlp(), _mlp(8)], optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    _trainer(tmp_path, max_epochs=2).fit(model, DistillDataModule("mnist1d", train_subset=100,
                                                                 batch_size=50))
    assert [opt.param_groups[0]["lr"] for opt in model.trainer.optimizers] == [0.25, 0.25]
