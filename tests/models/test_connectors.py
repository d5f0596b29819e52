"""Connectors: a convolution for feature maps, a linear map for vectors."""

from __future__ import annotations

import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.models import ConvConnector, LinearConnector, build_connector


# ---- connectors ---------------------------------------------------------------------------
def test_build_connector_picks_conv_for_maps_and_linear_for_vectors():
    c1 = build_connector((16, 10), (64, 10))
    assert isinstance(c1, ConvConnector) and isinstance(c1.conv, torch.nn.Conv1d)
    assert c1(torch.randn(2, 16, 10)).shape == (2, 64, 10)
    c2 = build_connector((16, 8, 8), (32, 8, 8))
    assert isinstance(c2.conv, torch.nn.Conv2d) and isinstance(c2.bn, torch.nn.BatchNorm2d)
    assert c2(torch.randn(2, 16, 8, 8)).shape == (2, 32, 8, 8)
    c3 = build_connector((100,), (64, 5))  # MLP hidden layer -> CNN map: flattened, linear
    assert isinstance(c3, LinearConnector) and c3(torch.randn(2, 100)).shape == (2, 320)
    with pytest.raises(KDConfigError, match=r"\(16, 10\).*\(32, 8, 8\)"):
        build_connector((16, 10), (32, 8, 8))
