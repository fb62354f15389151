"""Legacy torchvision checkpoint layouts that torchvision's own load hooks accept.

DenseNet: old checkpoints name the dense layers' modules `norm.1`/`conv.2` (densenet._load_state_dict
renames them); the family's key_fixups must give the same variables as modern keys.
MNASNet: version-1 checkpoints of non-1.0 widths keep a 32/16-channel stem (MNASNet._load_from_state_dict
rebuilds it); convert must infer `legacy_stem` and reproduce torch's logits.
"""

import re
import warnings

import jax
import numpy as np
import torch
import torchvision

from converters import parity
from converters.torchvision import convert


def test_densenet_legacy_keys_convert_like_modern_keys():
    sd = parity.torch_model("densenet121", num_classes=5, seed=0).state_dict()
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in sd.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    a, b = convert("densenet121", sd), convert("densenet121", legacy)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _mnasnet_v1_state_dict(alpha: float, num_classes: int) -> dict:
    """A version-1 MNASNet state_dict: torchvision's v1 stem (unscaled 32/16 channels), random weights."""
    from torchvision.models.mnasnet import _BN_MOMENTUM, _stack, _get_depths

    torch.manual_seed(0)
    model = torchvision.models.MNASNet(alpha, num_classes=num_classes)
    depths = _get_depths(alpha)
    v1_stem = [
        torch.nn.Conv2d(3, 32, 3, padding=1, stride=2, bias=False),
        torch.nn.BatchNorm2d(32, momentum=_BN_MOMENTUM),
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(32, 32, 3, padding=1, stride=1, groups=32, bias=False),
        torch.nn.BatchNorm2d(32, momentum=_BN_MOMENTUM),
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(32, 16, 1, padding=0, stride=1, bias=False),
        torch.nn.BatchNorm2d(16, momentum=_BN_MOMENTUM),
        _stack(16, depths[2], 3, 2, 3, 3, _BN_MOMENTUM),
    ]
    for idx, layer in enumerate(v1_stem):
        model.layers[idx] = layer
    model._version = 1  # recorded in the state_dict metadata, as an old checkpoint's
    parity.randomize_(model, seed=1)
    return model.state_dict()


def test_mnasnet_version1_checkpoint_matches_torch():
    sd = _mnasnet_v1_state_dict(0.5, num_classes=7)
    assert sd._metadata[""]["version"] == 1
    ref_model = torchvision.models.mnasnet0_5(num_classes=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's "previous version" warning
        ref_model.load_state_dict(sd, strict=True)
    ref_model.eval()
    x = parity.probe_batch(2, 45, 53, seed=3)
    ref = parity.torch_logits(ref_model, x)
    variables = convert("mnasnet0_5", dict(sd))
    assert variables["params"]["layers_0"]["kernel"].shape == (3, 3, 3, 32)
    got = parity.flax_logits("mnasnet0_5", variables, x, num_classes=7, legacy_stem=True)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
