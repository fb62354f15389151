"""Gradient parity against torch for the attention families: every parameter's gradient of an eval-mode
loss, torch's autograd against jtkd's (on the CPU, where float32 attention runs the fused MKL kernel with
its relative position biases and shifted-window masks). Random weights, odd sizes, 11 classes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import parity
from converters.torchvision import convert
from jtkd import models

# model: (batch, height, width); swin at an odd size pads its windows and shifts them with masks
CASES = {"vit_b_16": (1, 224, 224), "swin_t": (2, 75, 69), "swin_v2_t": (1, 67, 73), "maxvit_t": (1, 224, 224)}


@pytest.mark.parametrize("name", CASES)
def test_parameter_gradients_match_torch(name):
    torch_model = parity.torch_model(name, num_classes=11, seed=5)
    x = parity.probe_batch(*CASES[name], seed=6)
    weights = np.random.default_rng(7).standard_normal((CASES[name][0], 11)).astype(np.float32)
    torch_model.zero_grad()
    (torch_model(torch.from_numpy(x)) * torch.from_numpy(weights)).sum().backward()
    # the gradients in the state_dict's layout (buffers as they are), converted as the weights are
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in torch_model.named_parameters()}
    expected = convert(name, {k: grads.get(k, v) for k, v in torch_model.state_dict().items()})["params"]

    variables = convert(name, torch_model.state_dict())
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
