"""The way back for every registered model: convert -> to_torch reproduces the torchvision
state_dict exactly (every key, dtype and value) and torchvision loads it with strict=True.

BatchNorm's `num_batches_tracked` is the one exception: Flax has no use for it (torch reads it only
when momentum=None, which no torchvision classifier uses), so it comes back as 0."""

import numpy as np
import pytest
import torch

from converters import parity
from converters.torchvision import convert, to_torch
from jtkd.models import get_spec, list_models


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if get_spec(n).slow else n for n in names]


@pytest.mark.parametrize("name", _params(list_models()))
def test_round_trip_reproduces_state_dict(name):
    model = parity.torch_model(name, num_classes=9, seed=3)
    sd = model.state_dict()
    back = to_torch(name, convert(name, sd))
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype, k
        if k.endswith("num_batches_tracked"):
            assert back[k].item() == 0, k
            continue
        torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)
    model.load_state_dict(back, strict=True)
