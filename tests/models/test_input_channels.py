"""The input-channel check: the first convolution found is a guess, checked by running the network once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asfda.errors import AsfdaError
from asfda.models.loaded import LoadedModel
from asfda.models.preprocessing import Preprocessing


class _InnerFirst(nn.Module):
    """A one-channel network whose inner 8-channel layer is registered before its stem (as a scripted DiNTS lists
    its layers): the first convolution found says 8 input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv3d(8, 8, 3, padding=1)
        self.stem = nn.Conv3d(1, 8, 3, padding=1)
        self.head = nn.Conv3d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(self.stem(x)))


def _model(net: nn.Module) -> LoadedModel:
    return LoadedModel(net.eval(), ["background", "organ"], Preprocessing(), (16, 16, 16))


def test_a_network_that_runs_on_one_channel_is_accepted_whatever_layer_comes_first() -> None:
    model = _model(torch.jit.script(_InnerFirst()))
    assert model.in_channels == 8  # the guess
    model.check_input_channels(1)  # runs on one channel: accepted


def test_a_network_of_several_input_channels_is_still_refused_in_one_line() -> None:
    net = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.Conv3d(8, 2, 1))
    with pytest.raises(AsfdaError, match="expects 4 input channels, the dataset has 1"):
        _model(net).check_input_channels(1)
