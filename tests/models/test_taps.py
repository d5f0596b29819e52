import pytest
import torch
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.models import ConvNet1D, FeatureTaps, resnet8


def test_taps_record_outputs_and_pre_activations_by_path():
    net = resnet8(num_classes=10)
    taps = FeatureTaps(net, ["layer2", "layer3.0.bn2", "layer3.0.relu"],
                       pre_activation=[False, False, True])
    x = torch.randn(2, 3, 32, 32)
    net(x)
    l2, bn2, pre = taps.pop()
    assert l2.shape == (2, 32, 16, 16) and bn2.shape == (2, 64, 8, 8)
    assert pre.shape == (2, 64, 8, 8) and (pre < 0).any()  # before the ReLU: negatives present
    taps.remove()
    net(x)
    assert not taps._features and all(not m._forward_hooks and not m._forward_pre_hooks
                                      for m in net.modules())


def test_taps_on_torchvision_model_and_gradients_flow():
    from torchvision.models import resnet18

    net = resnet18(num_classes=10)
    with FeatureTaps(net, ["layer2"]) as taps:
        net(torch.randn(2, 3, 32, 32))
        (feat,) = taps.pop()
        feat.pow(2).mean().backward()
    assert net.layer1[0].conv1.weight.grad is not None
    assert net.fc.weight.grad is None  # only what produced the tapped feature gets gradient


def test_unknown_path_lists_nearest_names():
    with pytest.raises(KDConfigError, match="no module 'conv4'.*conv"):
        FeatureTaps(ConvNet1D(), ["conv4"])


def test_pop_before_forward_is_an_error():
    taps = FeatureTaps(nn.Sequential(nn.Linear(2, 2)), ["0"])
    with pytest.raises(RuntimeError, match="run a forward pass"):
        taps.pop()
