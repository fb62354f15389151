"""Eval parity with the parameters that torchvision initialises to degenerate values randomised.

The generic parity test keeps torchvision's init for everything but norms and biases; for some families
that hides most of the network: ConvNeXt's layer_scale is 1e-6 (blocks contribute ~nothing) and ViT's
head, class token are zero (logits are the head bias). Here those are random, so every block shows;
Swin's relative position tables and v2's logit scales get values far from their init as well.
"""

import re

import jax
import numpy as np
import pytest
import torch

from converters import parity
from converters.torchvision import convert

# parameter-name regex -> (std, mean) of the random values it gets
_PERTURB = {
    r".*layer_scale": (0.5, 0.0),
    r"heads\.head\.weight": (0.05, 0.0),
    r"class_token|encoder\.pos_embedding": (0.5, 0.0),
    r".*relative_position_bias_table": (0.5, 0.0),
    r".*logit_scale": (0.3, 2.0),
}


def _perturbed(name, seed=1, **kw):
    model = parity.torch_model(name, num_classes=13, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for key, p in model.named_parameters():
            for pat, (std, mean) in _PERTURB.items():
                if re.fullmatch(pat, key):
                    p.copy_(torch.randn(p.shape, generator=g) * std + mean)
    return model


def _check(name, model, size, atol=1e-4, **kw):
    x = parity.probe_batch(2, *size, seed=2)
    ref = parity.torch_logits(model, x)
    got = parity.flax_logits(name, convert(name, model.state_dict()), x, num_classes=13, **kw)
    assert np.abs(ref).max() > 0.1, "degenerate logits"
    diff = np.abs(got - ref).max()
    assert diff <= atol, f"{name}: max abs diff {diff:.3e} (max |logit| {np.abs(ref).max():.3g})"
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize(
    "name,size",
    [
        ("convnext_tiny", (97, 131)),
        ("vit_b_32", (224, 224)),
        ("swin_t", (101, 135)),
        ("swin_v2_t", (33, 47)),
        ("maxvit_t", (221, 223)),
    ],
)
def test_perturbed_eval_parity(name, size):
    _check(name, _perturbed(name), size)


def test_vit_representation_size_is_inferred_and_matches():
    model = _perturbed("vit_b_32", representation_size=37)
    assert "heads.pre_logits.weight" in model.state_dict()
    _check("vit_b_32", model, (224, 224), representation_size=37)


def test_vit_legacy_mlp_keys_convert():
    sd = parity.torch_model("vit_b_32", num_classes=5).state_dict()
    legacy = {re.sub(r"mlp\.0\.", "mlp.linear_1.", re.sub(r"mlp\.3\.", "mlp.linear_2.", k)): v for k, v in sd.items()}
    assert any("linear_1" in k for k in legacy) and not any(".mlp.0." in k for k in legacy)
    new, old = convert("vit_b_32", sd), convert("vit_b_32", legacy)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
        np.testing.assert_array_equal(a, b)
