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
    # the >300M-parameter models run one at a time in one xdist worker (--dist loadgroup): ~8 GB each
    big = (pytest.mark.slow, pytest.mark.xdist_group("large_models"))
    return [pytest.param(n, marks=big) if get_spec(n).slow else n for n in names]


@pytest.mark.parametrize("name", _params(list_models()))
def test_round_trip_reproduces_state_dict(name):
    model = parity.torch_model(name, num_classes=9, seed=3, calibrate=False)  # values only: no forward pass
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


def _assert_same_state(back, sd):
    assert list(back) == list(sd)
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("googlenet", {"aux_logits": False, "init_weights": False}),
        ("inception_v3", {"aux_logits": False, "init_weights": False}),
        ("vit_b_32", {"image_size": 160}),
    ],
)
def test_builder_kwargs_come_back_from_the_variables(name, kw):
    """Non-default architectures (no aux heads, ViT at 160 px) export with no kwargs passed to to_torch."""
    model = parity.torch_model(name, num_classes=6, seed=2, **kw)
    sd = model.state_dict()
    back = to_torch(name, convert(name, sd))
    _assert_same_state(back, sd)
    model.load_state_dict(back, strict=True)


def test_mnasnet_version1_stem_exports_as_version1():
    """A version-1 MNASNet checkpoint (32/16-channel stem) goes back with version 1 in its metadata, so
    a stock torchvision mnasnet0_5 loads it strictly and computes the Flax logits."""
    import warnings

    import torchvision
    from test_densenet_mnasnet_legacy import _mnasnet_v1_state_dict

    sd = _mnasnet_v1_state_dict(0.5, num_classes=7)
    variables = convert("mnasnet0_5", dict(sd))  # a bare dict: no metadata to go by
    back = to_torch("mnasnet0_5", variables)
    assert back._metadata[""]["version"] == 1
    _assert_same_state(back, sd)
    model = torchvision.models.mnasnet0_5(num_classes=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.load_state_dict(back, strict=True)
    x = parity.probe_batch(2, 45, 53, seed=4)
    ref = parity.torch_logits(model.eval(), x)
    got = parity.flax_logits("mnasnet0_5", variables, x, num_classes=7, legacy_stem=True)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # the harness rebuilds the same torch model from the checkpoint, with or without its metadata
    for ckpt in (sd, dict(sd)):
        np.testing.assert_allclose(parity.torch_logits(parity.torch_model("mnasnet0_5", ckpt), x), ref, atol=1e-6, rtol=0)
