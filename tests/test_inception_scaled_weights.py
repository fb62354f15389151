"""Eval parity of GoogLeNet and Inception v3 with well-scaled random weights.

torchvision initialises these two without fan-in scaling (trunc_normal std 0.01 / 0.1), so the generic
parity test sees logits ~0.08 (GoogLeNet) or ~2e9 (Inception v3) and its absolute tolerance says little.
Here every conv/linear weight is N(0, 1/fan_in) and the BatchNorms are calibrated on them, which keeps the
logits O(1), so the standard 1e-4 tolerance is meaningful.
"""

import math

import numpy as np
import pytest
import torch
import torchvision

from converters import parity
from converters.torchvision import convert


@pytest.mark.parametrize("name,size", [("googlenet", (97, 131)), ("inception_v3", (139, 157))])
def test_scaled_weights_eval_parity(name, size):
    model = torchvision.models.get_model(name, weights=None, num_classes=13)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / math.sqrt(mod.weight[0].numel()))
    # BatchNorm statistics calibrated on the rescaled weights, then perturbed (as in the generic test)
    parity.randomize_(model, seed=1, calibrate=parity.probe_batch(4, *size, seed=1001)).eval()
    x = parity.probe_batch(2, *size, seed=2)
    ref = parity.torch_logits(model, x)
    got = parity.flax_logits(name, convert(name, model.state_dict()), x, num_classes=13)
    assert np.abs(ref).max() > 1e-2  # the logits are not degenerate
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)  # logits O(1) with calibrated BatchNorm, as the generic test
