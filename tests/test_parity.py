"""Eval-mode logit parity of every registered model against torchvision.

Random torchvision weights, randomised BatchNorm affine parameters and running statistics
(converters.parity.randomize_), a non-default num_classes, a non-224 odd input size where the
architecture allows and batch > 1. Tolerance: the spec's atol (1e-4 unless justified), fp32 with
highest matmul precision; argmax must agree.
"""

import numpy as np
import pytest

from converters import parity
from converters.torchvision import convert
from jtkd.models import get_spec, list_models

NUM_CLASSES = 13


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if get_spec(n).slow else n for n in names]


@pytest.mark.parametrize("name", _params(list_models()))
def test_eval_logits_match_torchvision(name):
    spec = get_spec(name)
    model = parity.torch_model(name, num_classes=NUM_CLASSES, seed=1)
    x = parity.probe_batch(2, *spec.test_size, seed=2)
    ref = parity.torch_logits(model, x)
    variables = convert(name, model.state_dict())
    got = parity.flax_logits(name, variables, x, num_classes=NUM_CLASSES)
    assert got.shape == ref.shape == (2, NUM_CLASSES)
    diff = np.abs(got - ref).max()
    assert diff <= spec.atol, f"{name}: max abs logit diff {diff:.3e} > {spec.atol} (max |logit| {np.abs(ref).max():.3g})"
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
