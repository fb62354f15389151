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


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_value_and_gradient_match_torch(axis):
    """layers.softmax's hand-written backward against torch's autograd, with a random cotangent
    (the gradient of sum(y) alone is zero) and scores large enough for the max shift to matter."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 13, 7)) * 20).astype(np.float32)
    g = rng.standard_normal((3, 13, 7)).astype(np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    y = torch.softmax(xt, dim=axis)
    y.backward(torch.from_numpy(g))
    got, vjp = jax.vjp(lambda v: layers.softmax(v, axis), jnp.asarray(x))
    (dx,) = jax.jit(vjp)(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(got), y.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    # and against JAX's own derivative, second order included (custom_vjp's backward is differentiable)
    small = jnp.asarray(x[:1, :4, :3] / 20)  # unsaturated: second derivatives of order 0.1
    hess = jax.hessian(lambda v: layers.softmax(v, axis)[0, 0, 0])(small)
    ref = jax.hessian(lambda v: jax.nn.softmax(v, axis)[0, 0, 0])(small)
    assert float(jnp.abs(ref).max()) > 0.05
    np.testing.assert_allclose(np.asarray(hess), np.asarray(ref), rtol=1e-4, atol=1e-6)
