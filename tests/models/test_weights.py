"""Teacher weights: RepDistiller checkpoints, torchvision weights by name, timm models, one clear
error for every file that cannot be used, and a checkpoint of another shape named key by key."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from kd_lightning import KDConfigError, models as M
from kd_lightning.models import ConvNet1D
from kd_lightning.models.weights import load_teacher_weights
from tests.conftest import CONFIGS, TINY, assert_mnist1d_config_refused, run_cli, write_cifar


# ---- RepDistiller checkpoints ------------------------------------------------------------
def repdistiller_wrn_name(key: str) -> str:
    """kd_lightning WideResNet key -> the name RepDistiller's models/wrn.py gives that tensor
    (stages ``blockK`` holding a Sequential ``layer``, shortcut ``convShortcut``, final BN ``bn1``)."""
    key = re.sub(r"^layer(\d)\.(\d+)\.", r"block\1.layer.\2.", key)
    key = key.replace(".downsample.", ".convShortcut.")
    return re.sub(r"^bn\.", "bn1.", key)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode logits depend on them."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.num_batches_tracked.fill_(123)
    return model.eval()


def write_repdistiller(path: Path, model: torch.nn.Module, rename=lambda k: k, prefix: str = "",
                       drop_counters: bool = False) -> None:
    """A checkpoint as RepDistiller's train_teacher.py writes it: the weights under ``model``,
    beside the epoch, the accuracy, the optimizer state and the run's argparse.Namespace."""
    state = {prefix + rename(k): v.clone() for k, v in model.state_dict().items()
             if not (drop_counters and k.endswith("num_batches_tracked"))}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = argparse.Namespace(model="wrn_40_2", dataset="cifar100", learning_rate=0.05,
                             lr_decay_epochs=[150, 180, 210], trial="0")
    torch.save({"epoch": 240, "model": state, "best_acc": torch.tensor(75.61),
                "optimizer": optimizer.state_dict(), "opt": opt}, path)


@pytest.mark.parametrize("factory, rename", [
    (M.wrn_40_2, repdistiller_wrn_name),
    (M.wrn_16_1, repdistiller_wrn_name),   # stage 1 without a shortcut conv (16 -> 16 channels)
    (M.resnet8x4, lambda k: k),            # RepDistiller's CIFAR ResNets share the key names
    (M.resnet20, lambda k: k),
])
def test_repdistiller_checkpoint_loads_strictly_with_identical_logits(factory, rename, tmp_path):
    torch.manual_seed(0)
    source = randomised(factory(num_classes=100))
    names = [rename(k) for k in source.state_dict()]
    if factory in (M.wrn_40_2, M.wrn_16_1):  # the layout really is the foreign one
        assert "block3.layer.0.convShortcut.weight" in names and "bn1.running_var" in names
        assert not any(n.startswith("layer") for n in names)
    path = tmp_path / "ckpt_epoch_240.pth"
    write_repdistiller(path, source, rename)
    torch.manual_seed(1)
    teacher = factory(num_classes=100).eval()
    load_teacher_weights(teacher, path)
    for key, value in source.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), source(x))


def test_repdistiller_wrn_from_data_parallel_and_old_pytorch_loads(tmp_path):
    """``module.`` prefixes (nn.DataParallel) and files without BatchNorm's num_batches_tracked
    (PyTorch < 0.4.1) load too; the counters do not change the evaluated network."""
    source = randomised(M.wrn_16_1(num_classes=10))
    path = tmp_path / "dp.pth"
    write_repdistiller(path, source, repdistiller_wrn_name, prefix="module.", drop_counters=True)
    teacher = M.wrn_16_1(num_classes=10).eval()
    load_teacher_weights(teacher, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), source(x))


def test_namespace_is_the_only_object_allowed(tmp_path):
    """The Namespace is rebuilt (not refused), and nothing else is let through with it."""
    path = tmp_path / "t.pth"
    write_repdistiller(path, M.resnet8(num_classes=10))
    with pytest.raises(Exception, match="argparse.Namespace"):  # plain weights_only refuses it
        torch.load(path, weights_only=True)
    load_teacher_weights(M.resnet8(num_classes=10), path)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # not allowed globally


class _RunsCode:
    """An object whose unpickling would run code (create a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("with_namespace", [False, True])
def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(with_namespace, tmp_path):
    marker = tmp_path / "code_ran"
    net = M.resnet8(num_classes=10)
    obj = {"model": net.state_dict(), "payload": _RunsCode(marker)}
    if with_namespace:
        obj["opt"] = argparse.Namespace(lr=0.1)
    torch.save(obj, tmp_path / "evil.pth")
    with pytest.raises(KDConfigError, match=r"holds a Python object of type posix.system, which is not "
                                            r"loaded.*weights_only=True"):
        load_teacher_weights(net, tmp_path / "evil.pth")
    assert not marker.exists()


def test_corrupt_truncated_and_empty_files_each_give_one_clear_error(tmp_path):
    net = M.resnet8(num_classes=10)
    good = tmp_path / "good.pth"
    torch.save(net.state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_bytes(b"this is not a checkpoint\n")
    with pytest.raises(KDConfigError, match=r"'.*truncated.pth' \(\d+ bytes\) is corrupt or truncated"):
        load_teacher_weights(net, tmp_path / "truncated.pth")
    with pytest.raises(KDConfigError, match=r"is an empty file \(0 bytes\)"):
        load_teacher_weights(net, tmp_path / "empty.pth")
    with pytest.raises(KDConfigError, match=r"'.*text.pth' \(25 bytes\) is corrupt or truncated"):
        load_teacher_weights(net, tmp_path / "text.pth")


def test_a_raw_pickle_is_named_as_one_and_never_unpickled(tmp_path):
    """A ``pickle.dump`` file is not what torch.save writes (a zip archive, or its legacy format
    headed by torch's magic number): the message says so, instead of "corrupt or truncated"."""
    import pickle

    net = M.resnet8(num_classes=10)
    marker = tmp_path / "code_ran"
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump({"model": net.state_dict(), "payload": _RunsCode(marker)}, f)
    with pytest.raises(KDConfigError, match=r"'.*raw.pkl' \(\d+ bytes\) is a raw pickle \(pickle.dump\), "
                                            r"not a checkpoint written by torch.save"):
        load_teacher_weights(net, tmp_path / "raw.pkl")
    assert not marker.exists()
    # torch.save's legacy (non-zip) format, as old RepDistiller files have, still loads
    torch.save(randomised(net).state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    loaded = M.resnet8(num_classes=10)
    load_teacher_weights(loaded, tmp_path / "legacy.pth")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_a_foreign_layout_names_missing_and_unexpected_keys(tmp_path):
    net = M.resnet8(num_classes=10)
    foreign = {k.replace("layer", "stage"): v for k, v in net.state_dict().items()}
    torch.save({"model": foreign}, tmp_path / "foreign.pth")
    with pytest.raises(KDConfigError) as err:
        load_teacher_weights(M.resnet8(num_classes=10), tmp_path / "foreign.pth")
    message = str(err.value)
    n = sum(k.startswith("layer") for k in net.state_dict())
    assert f"keys of the model missing from the checkpoint: {n} ('layer1.0.conv1.weight' (16, 16, 3, 3)" in message
    assert f"unexpected keys in the checkpoint: {n} ('stage1.0.conv1.weight' (16, 16, 3, 3)" in message
    assert message.count("'layer") == 5 and message.count("'stage") == 5  # the first few of each
    assert "RepDistiller Wide ResNet" in message  # the layouts tried
    # a file without any tensor dictionary
    torch.save({"epoch": 3, "acc": 0.5}, tmp_path / "meta.pth")
    with pytest.raises(KDConfigError, match="holds no state_dict.*found dict with keys epoch, acc"):
        load_teacher_weights(net, tmp_path / "meta.pth")


def test_foreign_checkpoint_through_the_cli_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    torch.save({"model": {"encoder.weight": torch.zeros(3, 3)}}, tmp_path / "foreign.pth")
    assert_mnist1d_config_refused("response.yaml", [], ["matches no known layout", "'encoder.weight' (3, 3)"],
                                  str(tmp_path / "foreign.pth"), tmp_path, monkeypatch, capsys)


# ---- torchvision weights by name -----------------------------------------------------------
def test_torchvision_weights_resolve_by_name_and_load_from_the_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights, resnet18

    from kd_lightning.models.torchvision_model import resolve_torchvision_weights

    for name in ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        assert resolve_torchvision_weights("resnet18", name) is ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(KDConfigError, match="unknown weights 'ResNet34_Weights.IMAGENET1K_V1' .*"
                                            "Available: DEFAULT, ResNet18_Weights.IMAGENET1K_V1"):
        resolve_torchvision_weights("resnet18", "ResNet34_Weights.IMAGENET1K_V1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    reference = resnet18(num_classes=1000).eval()
    torch.save(reference.state_dict(), cached)
    model = M.TorchvisionModel("resnet18", num_classes=1000, weights="DEFAULT").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # a student fine-tuned from the weights: a new classifier for the data set's classes
    student = M.TorchvisionModel("resnet18", num_classes=10, weights="DEFAULT", replace_head=True)
    assert student.model.fc.out_features == 10
    assert torch.equal(student.model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    with pytest.raises(KDConfigError, match="trained for 1000 classes but num_classes=10.*replace_head"):
        M.TorchvisionModel("resnet18", num_classes=10, weights="DEFAULT")


def test_torchvision_weights_missing_from_the_cache_offline_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(KDConfigError, match=rf"not in the torch hub cache \({re.escape(str(expected))}\) "
                                            r"and could not be downloaded.*download https://"):
        M.TorchvisionModel("resnet18", num_classes=1000, weights="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(KDConfigError, match=r"unknown torchvision model 'resnet19' \(close matches: resnet18"):
        M.TorchvisionModel("resnet19")


# ---- timm (optional) ---------------------------------------------------------------------
def test_timm_missing_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(KDConfigError, match=r"pip install kd_lightning\[timm\]"):
        M.TimmModel("resnet18")


def test_timm_model_by_name_with_taps_and_an_unknown_name():
    pytest.importorskip("timm")
    model = M.TimmModel("resnet10t", num_classes=7, in_channels=1)
    taps = M.FeatureTaps(model, ["model.layer2", "model.layer4"])
    logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 7)
    features = taps.pop()
    assert [f.shape[1] for f in features] == [128, 512]
    with pytest.raises(KDConfigError, match=r"unknown timm model 'resnet19' \(close matches: .*resnet18"):
        M.TimmModel("resnet19")


def test_repdistiller_teacher_distils_into_a_timm_student_through_the_cli(tmp_path, monkeypatch):
    """The README's "Your own teacher" setup, tiny: attention transfer from a RepDistiller WRN
    checkpoint into a timm ResNet, with feature taps on both by module path."""
    pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path / "data", 100, n_train=200, n_test=40)
    teacher = randomised(M.wrn_16_1(num_classes=100))
    write_repdistiller(tmp_path / "ckpt_epoch_240.pth", teacher, repdistiller_wrn_name)
    cli = run_cli([
        "fit", "--config", CONFIGS / "cifar100/at_resnet56_resnet20.yaml", *TINY,
        "--model.init_args.teacher", "kd_lightning.models.wrn_16_1",
        "--model.init_args.teacher_checkpoint", tmp_path / "ckpt_epoch_240.pth",
        "--model.init_args.teacher_layers", "[layer1, layer2, layer3]",
        "--model.init_args.student", "kd_lightning.models.TimmModel",
        "--model.init_args.student.init_args.name", "resnet10t",
        "--model.init_args.student_layers", "[model.layer2, model.layer3, model.layer4]",
        "--data.batch_size", "8", "--data.val_split", "20"])
    loaded = cli.model.teacher.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in teacher.state_dict().items())
    assert 0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1


def test_checkpoint_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(ConvNet1D(width=16).state_dict(), path)
    with pytest.raises(KDConfigError, match=r"'conv1.weight' has shape \(16, 1, 5\) .* \(25, 1, 5\)"):
        load_teacher_weights(ConvNet1D(width=25), path)
    # a prefixed plain state_dict (as saved from a wrapper module) loads
    net = ConvNet1D(width=16)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    other = ConvNet1D(width=16)
    load_teacher_weights(other, path)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
