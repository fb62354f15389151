"""jtkd's activations against torch's, value and gradient, tails included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jtkd.models import layers


@pytest.mark.parametrize(("ours", "theirs"), [
    (layers.gelu, torch.nn.functional.gelu),
    (layers.hardswish, torch.nn.functional.hardswish),
    (layers.hardsigmoid, torch.nn.functional.hardsigmoid),
    (layers.silu, torch.nn.functional.silu),
], ids=["gelu", "hardswish", "hardsigmoid", "silu"])
def test_activation_matches_torch(ours, theirs):
    x = np.concatenate([np.linspace(-12, 12, 20001, dtype=np.float32),
                        np.random.default_rng(0).standard_normal(20000).astype(np.float32)])
    xt = torch.from_numpy(x.copy()).requires_grad_()
    y = theirs(xt)
    y.sum().backward()
    got, grad = jax.jit(jax.value_and_grad(lambda v: ours(v).sum()))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), y.detach().numpy(), rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=1e-6, atol=2e-6)


def test_gelu_keeps_the_input_dtype():
    assert layers.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
