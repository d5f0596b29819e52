"""Tests for the model zoo (kd_lightning.models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning import models as M


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# (factory, kwargs, input shape (without batch), num_classes)
ALL_MODELS = [
    pytest.param(M.MLP, {}, (40,), 10, id="MLP"),
    pytest.param(M.MLP, {"input_dim": 784, "hidden_dims": [64]}, (1, 28, 28), 10, id="MLP-image"),
    pytest.param(M.ConvNet1D, {}, (1, 40), 10, id="ConvNet1D"),
    pytest.param(M.LeNet5, {}, (1, 28, 28), 10, id="LeNet5"),
    pytest.param(M.LeNet5Half, {}, (1, 28, 28), 10, id="LeNet5Half"),
    pytest.param(M.lenet5_half, {}, (1, 28, 28), 10, id="lenet5_half"),
    pytest.param(
        M.CifarResNet, {"depth": 14, "num_filters": [8, 8, 16, 24]}, (3, 32, 32), 7, id="CifarResNet"
    ),
    pytest.param(M.resnet8, {}, (3, 32, 32), 100, id="resnet8"),
    pytest.param(M.resnet14, {}, (3, 32, 32), 10, id="resnet14"),
    pytest.param(M.resnet20, {}, (3, 32, 32), 10, id="resnet20"),
    pytest.param(M.resnet32, {}, (3, 32, 32), 10, id="resnet32"),
    pytest.param(M.resnet44, {}, (3, 32, 32), 10, id="resnet44"),
    pytest.param(M.resnet56, {}, (3, 32, 32), 10, id="resnet56"),
    pytest.param(M.resnet110, {}, (3, 32, 32), 10, id="resnet110"),
    pytest.param(M.resnet8x4, {}, (3, 32, 32), 100, id="resnet8x4"),
    pytest.param(M.resnet32x4, {}, (3, 32, 32), 10, id="resnet32x4"),
    pytest.param(M.WideResNet, {"depth": 10, "widen_factor": 1}, (3, 32, 32), 5, id="WideResNet"),
    pytest.param(M.wrn_16_1, {}, (3, 32, 32), 10, id="wrn_16_1"),
    pytest.param(M.wrn_16_2, {}, (3, 32, 32), 10, id="wrn_16_2"),
    pytest.param(M.wrn_40_1, {}, (3, 32, 32), 10, id="wrn_40_1"),
    pytest.param(M.wrn_40_2, {}, (3, 32, 32), 100, id="wrn_40_2"),
]


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize(
    "factory, kwargs, expected",
    [
        pytest.param(M.MLP, {}, 15_210, id="MLP-40-100-100-10"),
        pytest.param(M.ConvNet1D, {}, 5_210, id="ConvNet1D-w25"),
        pytest.param(M.LeNet5, {}, 61_706, id="LeNet5"),
        pytest.param(M.resnet20, {"num_classes": 100}, 0.28e6, id="resnet20"),
        pytest.param(M.resnet56, {"num_classes": 100}, 0.86e6, id="resnet56"),
        pytest.param(M.resnet110, {"num_classes": 100}, 1.74e6, id="resnet110"),
        pytest.param(M.resnet8x4, {"num_classes": 100}, 1.23e6, id="resnet8x4"),
        pytest.param(M.resnet32x4, {"num_classes": 100}, 7.43e6, id="resnet32x4"),
        pytest.param(M.wrn_16_2, {"num_classes": 100}, 0.70e6, id="wrn_16_2"),
        pytest.param(M.wrn_40_2, {"num_classes": 100}, 2.26e6, id="wrn_40_2"),
    ],
)
def test_parameter_counts_match_references(factory, kwargs, expected):
    count = n_params(factory(**kwargs))
    assert abs(count - expected) / expected < 0.03, f"{count} params vs reference {expected}"


def test_exact_small_model_counts():
    # Hand-computed: 40*100+100 + 100*100+100 + 100*10+10
    assert n_params(M.MLP()) == 15_210
    # conv1 1*25*5+25, conv2/conv3 25*25*3+25 each, fc 125*10+10
    assert n_params(M.ConvNet1D()) == 150 + 2 * 1_900 + 1_260
    assert n_params(M.LeNet5()) == 61_706


def test_lenet5_half_is_strictly_smaller_and_half_width():
    full, half = M.LeNet5(), M.LeNet5Half()
    assert n_params(half) < n_params(full)
    assert half.conv1.out_channels == 3 and half.conv2.out_channels == 8
    assert half.fc1.out_features == 60 and half.fc2.out_features == 42
    assert half.feature_dim == 42
    assert isinstance(M.lenet5_half(num_classes=5), M.LeNet5Half)
    assert M.lenet5_half(num_classes=5).fc.out_features == 5
    assert n_params(M.LeNet5(width_mult=0.5)) == n_params(half)


def test_lenet5_width_mult_never_below_one_channel():
    tiny = M.LeNet5(width_mult=0.01)
    assert tiny.conv1.out_channels == 1 and tiny.fc2.out_features == 1
    assert tiny(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_x4_variants_use_wide_filters():
    assert M.resnet8x4().num_filters == [32, 64, 128, 256]
    assert M.resnet32x4().feature_dim == 256
    assert M.resnet20().num_filters == [16, 16, 32, 64]
    assert M.resnet20().feature_dim == 64


# ---------------------------------------------------------------- interface contract
@pytest.mark.parametrize("factory, kwargs, in_shape, num_classes", ALL_MODELS)
def test_shapes_and_forward_equals_fc_of_features(factory, kwargs, in_shape, num_classes):
    torch.manual_seed(0)
    model = factory(num_classes=num_classes, **kwargs).eval()
    x = torch.randn(3, *in_shape)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
    assert logits.shape == (3, num_classes)
    assert feats.shape == (3, model.feature_dim)
    assert isinstance(model.feature_dim, int) and model.fc.in_features == model.feature_dim
    torch.testing.assert_close(logits, model.fc(feats))
    assert torch.isfinite(logits).all()
    # Different inputs give different logits (the model is not degenerate).
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("factory, kwargs, in_shape, num_classes", ALL_MODELS)
def test_runs_under_cpu_bf16_autocast_and_backprops(factory, kwargs, in_shape, num_classes):
    torch.manual_seed(0)
    model = factory(num_classes=num_classes, **kwargs)
    x = torch.randn(2, *in_shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (2, num_classes)
    assert logits.dtype == torch.bfloat16  # the final Linear ran in bf16
    assert torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "factory, kwargs, in_shape",
    [
        (M.MLP, {}, (40,)),
        (M.ConvNet1D, {}, (1, 40)),
        (M.LeNet5, {}, (1, 28, 28)),
        (M.resnet20, {}, (3, 32, 32)),
        (M.wrn_16_2, {"dropout": 0.3}, (3, 32, 32)),
    ],
)
def test_deterministic_given_seed(factory, kwargs, in_shape):
    outs, states = [], []
    for _ in range(2):
        torch.manual_seed(123)
        model = factory(**kwargs)
        x = torch.randn(4, *in_shape)
        outs.append(model(x))  # train mode: BN batch stats, dropout masks from the RNG
        states.append(model.state_dict())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    torch.manual_seed(124)
    other = factory(**kwargs)
    assert not torch.equal(other.fc.weight, states[0]["fc.weight"])


# ---------------------------------------------------------------- 1-D models
def test_mlp_accepts_flat_channel_and_image_inputs():
    torch.manual_seed(0)
    mlp = M.MLP().eval()
    x = torch.randn(5, 40)
    out_flat = mlp(x)
    torch.testing.assert_close(mlp(x.unsqueeze(1)), out_flat)  # [B, 1, L]
    assert out_flat.shape == (5, 10)
    img = M.MLP(input_dim=3 * 8 * 8, in_channels=3, hidden_dims=[32, 16, 8])
    assert img(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert [n for n, _ in img.named_children()] == [
        "fc1", "relu1", "fc2", "relu2", "fc3", "relu3", "fc",
    ]
    assert img.feature_dim == 8


def test_mlp_without_hidden_layers_is_linear():
    lin = M.MLP(hidden_dims=[], num_classes=4)
    assert n_params(lin) == 40 * 4 + 4 and lin.feature_dim == 40
    x = torch.randn(3, 40)
    torch.testing.assert_close(lin.forward_features(x), x)


def test_mlp_rejects_wrong_input_size():
    with pytest.raises(ValueError, match="input_dim=40"):
        M.MLP()(torch.randn(2, 41))


def test_convnet1d_accepts_flat_and_channel_inputs():
    torch.manual_seed(0)
    cnn = M.ConvNet1D().eval()
    x = torch.randn(6, 40)
    out = cnn(x)
    assert out.shape == (6, 10)
    torch.testing.assert_close(cnn(x.unsqueeze(1)), out)
    two_ch = M.ConvNet1D(in_channels=2, input_length=64, num_classes=3)
    assert two_ch(torch.randn(2, 2, 64)).shape == (2, 3)
    with pytest.raises(ValueError):
        cnn(torch.randn(2, 3, 40))  # wrong channel count


def test_convnet1d_reference_lengths_and_hookable_preactivations():
    cnn = M.ConvNet1D().eval()
    seen = {}
    hooks = [
        getattr(cnn, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
        for name in ("conv1", "conv2", "conv3", "relu3")
    ]
    cnn(torch.randn(8, 40))
    for h in hooks:
        h.remove()
    assert seen["conv1"].shape == (8, 25, 19)
    assert seen["conv2"].shape == (8, 25, 10)
    assert seen["conv3"].shape == (8, 25, 5)
    assert cnn.feature_dim == 125 and cnn.final_length == 5
    # relu is not in-place: the conv3 output captured by the hook keeps its negatives.
    assert (seen["conv3"] < 0).any()
    torch.testing.assert_close(seen["relu3"], seen["conv3"].clamp_min(0))


def test_convnet1d_width_changes_size():
    small, base, wide = M.ConvNet1D(width=8), M.ConvNet1D(), M.ConvNet1D(width=64)
    assert n_params(small) < n_params(base) < n_params(wide)
    assert small.feature_dim == 8 * 5 and wide.feature_dim == 64 * 5
    assert wide.conv2.weight.shape == (64, 64, 3)
    assert wide(torch.randn(2, 40)).shape == (2, 10)


# ---------------------------------------------------------------- hook paths
def test_resnet_module_paths_and_pre_relu_block_output():
    torch.manual_seed(0)
    model = M.resnet20().eval()
    names = dict(model.named_modules())
    for path in ("conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer3.1.bn2",
                 "layer3.2.relu", "layer2.0.downsample", "avgpool", "fc"):
        assert path in names, path
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 3
    assert names["layer1.0"].downsample is None  # 16 -> 16, stride 1: identity shortcut

    block = model.layer3[1]
    captured = {}
    block.bn2.register_forward_hook(lambda m, i, o: captured.__setitem__("bn2", o))
    block.register_forward_pre_hook(lambda m, i: captured.__setitem__("block_in", i[0]))
    block.relu.register_forward_pre_hook(lambda m, i: captured.__setitem__("pre_relu", i[0]))
    block.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    model(torch.randn(2, 3, 32, 32))
    # Pre-ReLU block output = residual branch + identity shortcut, and it keeps negatives.
    torch.testing.assert_close(captured["pre_relu"], captured["bn2"] + captured["block_in"])
    assert (captured["pre_relu"] < 0).any()
    torch.testing.assert_close(captured["out"], captured["pre_relu"].clamp_min(0))


def test_resnet_stage_shapes():
    model = M.resnet8x4().eval()
    shapes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, o.shape)
        )
    model(torch.randn(1, 3, 32, 32))
    assert shapes == {
        "layer1": (1, 64, 32, 32),
        "layer2": (1, 128, 16, 16),
        "layer3": (1, 256, 8, 8),
    }
    assert model.layer1[0].downsample is not None  # stem 32 -> 64 channels


def test_wrn_module_paths_and_depth():
    model = M.wrn_40_2()
    names = dict(model.named_modules())
    for path in ("conv1", "layer1.0.bn1", "layer2.0.downsample", "layer3.5.conv2", "bn", "relu", "fc"):
        assert path in names, path
    assert len(model.layer1) == 6 and model.feature_dim == 128
    assert "layer3.6" not in names
    assert M.wrn_16_1().feature_dim == 64


def test_wrn_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = M.WideResNet(depth=10, widen_factor=1, dropout=0.5)
    assert model.layer1[0].dropout.p == 0.5
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_resnet_convs_use_kaiming_fan_out_init():
    torch.manual_seed(0)
    conv = M.resnet56().layer3[0].conv2  # 64 -> 64, 3x3: fan_out = 576
    expected_std = (2.0 / (64 * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert torch.all(M.resnet56().layer2[0].bn1.weight == 1)


# ---------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "build",
    [
        lambda: M.CifarResNet(depth=21),
        lambda: M.CifarResNet(num_filters=[16, 32]),
        lambda: M.WideResNet(depth=18),
        lambda: M.WideResNet(dropout=1.0),
        lambda: M.ConvNet1D(input_length=2),
        lambda: M.MLP(hidden_dims=[0]),
        lambda: M.LeNet5(width_mult=0.0),
    ],
)
def test_invalid_configs_raise_config_error(build):
    with pytest.raises(KDConfigError):
        build()


# ---------------------------------------------------------------- external compatibility
def test_torchvision_classifier_satisfies_logits_contract():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_models_build_from_class_path_config():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--model", type=nn.Module)
    for class_path, init_args, num_classes in [
        ("kd_lightning.models.MLP", {"hidden_dims": [32, 16], "num_classes": 4}, 4),
        ("kd_lightning.models.resnet8", {"num_classes": 100}, 100),
        ("kd_lightning.models.wrn_16_1", {"num_classes": 7, "dropout": 0.1}, 7),
        ("kd_lightning.models.LeNet5Half", {"num_classes": 3}, 3),
    ]:
        cfg = parser.parse_object({"model": {"class_path": class_path, "init_args": init_args}})
        model = parser.instantiate_classes(cfg).model
        assert type(model).__name__ == class_path.rsplit(".", 1)[1]
        assert model.fc.out_features == num_classes
    cfg = parser.parse_object({"model": {"class_path": "kd_lightning.models.MLP"}})
    assert cfg.model.init_args.hidden_dims == [100, 100]
    assert cfg.model.init_args.input_dim == 40
