"""Gradient parity against torch, one model of every family: every parameter's gradient of an eval-mode loss,
torch's autograd in float64 against jtkd's in float32. Fine-tuning follows these gradients, and jtkd computes many of them its
own way on the CPU (oneDNN convolutions, MKL matmuls, the fused attention with Swin's masks, closed-form
norm and max-pool backwards). Random weights and BatchNorm statistics, odd sizes, 11 classes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import parity
from converters.torchvision import convert
from jtkd import models

# model: (batch, height, width), odd sizes where the architecture allows; swin at an odd size pads its
# windows and shifts them with masks
CASES = {
    "alexnet": (2, 67, 71), "convnext_tiny": (2, 67, 61), "densenet121": (2, 37, 41), "efficientnet_b0": (2, 45, 51),
    "efficientnet_v2_s": (2, 45, 39), "googlenet": (2, 39, 45), "inception_v3": (1, 79, 83), "maxvit_t": (1, 224, 224),
    "mnasnet0_5": (2, 45, 39), "mobilenet_v2": (2, 41, 37), "mobilenet_v3_small": (2, 45, 51),
    "regnet_x_400mf": (2, 39, 45), "regnet_y_400mf": (2, 45, 39), "resnet18": (2, 39, 45), "resnext50_32x4d": (2, 37, 33),
    "shufflenet_v2_x0_5": (2, 45, 51), "squeezenet1_1": (2, 45, 39), "swin_t": (2, 75, 69), "swin_v2_t": (1, 67, 73),
    "vgg11_bn": (1, 35, 33), "vit_b_16": (1, 224, 224),
}


# A known bug, kept visible: googlenet's jit-compiled gradient with jtkd's CPU routing is up to 1% off in
# the early layers (conv1's BatchNorm bias: 0.0088 of 1.59), while the same computation run eagerly
# (jax.disable_jit) and the XLA-only routing (layers.xla_operations) are within 1e-6. It needs the 1x1
# convolutions as FFI calls (MKL's or oneDNN's); it is not the max-pool tie rule nor XLA's YNNPACK fusions,
# and it predates the fused attention. strict: the case fails the suite once it passes, to be moved back.
_KNOWN_BAD = {"googlenet": "jit gradient with the CPU routing off by up to 1% (see the comment above)"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=_KNOWN_BAD[n]))
                                  if n in _KNOWN_BAD else n for n in CASES])
def test_parameter_gradients_match_torch(name):
    torch_model = parity.torch_model(name, num_classes=11, seed=5)
    x = parity.probe_batch(*CASES[name], seed=6)
    weights = np.random.default_rng(7).standard_normal((CASES[name][0], 11)).astype(np.float32)
    variables = convert(name, torch_model.state_dict())
    # The reference is torch in float64: torch's own float32 gradients can be the less accurate side
    # (resnext50's first BatchNorm bias: 0.7% off the float64 values, jtkd's float32 1e-6).
    torch_model.double().zero_grad()
    (torch_model(torch.from_numpy(x).double()) * torch.from_numpy(weights).double()).sum().backward()
    # the gradients in the state_dict's layout (buffers as they are), converted as the weights are
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).float() for k, p in torch_model.named_parameters()}
    expected = convert(name, {k: grads.get(k, v.float()) for k, v in torch_model.state_dict().items()})["params"]

    module = models.create(name, num_classes=11)

    def loss(params, x):
        return jnp.sum(module.apply({**variables, "params": params}, x, train=False) * weights)

    with jax.default_matmul_precision("highest"):
        got = jax.jit(jax.grad(loss))(variables["params"], jnp.asarray(x.transpose(0, 2, 3, 1)))
    want_leaves = dict(jax.tree_util.tree_leaves_with_path(expected))
    got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
    assert want_leaves.keys() == got_leaves.keys()
    scale = max(float(np.abs(v).max()) for v in want_leaves.values())
    checked = 0
    for path, want in want_leaves.items():
        g, w = np.asarray(got_leaves[path]), np.asarray(want)
        assert g.shape == w.shape, path
        # relative to the largest gradient of the model: tiny gradients carry float32 noise of the big ones
        np.testing.assert_allclose(g, w, atol=2e-5 * scale, rtol=1e-3, err_msg=jax.tree_util.keystr(path))
        checked += bool(np.abs(w).max() > 1e-3 * scale)
    assert checked > len(want_leaves) // 2  # most gradients are far from zero: the comparison means something
