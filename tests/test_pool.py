"""`layers.max_pool` against torch's `max_pool2d`: values and input gradients, ties included.

On CPU the pool is a max over strided windows with a custom VJP (no reduce-window); its gradient must
go to the first maximum of each window in row-major order, exactly where torch sends it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jtkd.models import layers

# (input NHWC, kernel, stride, padding, ceil_mode): resnet/densenet stems, googlenet/squeezenet ceil pools
CASES = {
    "k3s2p1": ((2, 13, 11, 5), 3, 2, 1, False),
    "k3s2_ceil": ((2, 13, 10, 5), 3, 2, 0, True),
    "k2s2_ceil_odd": ((1, 9, 7, 3), 2, 2, 0, True),
    "k3s1p1_ceil": ((2, 8, 8, 4), 3, 1, 1, True),
    "vgg_k2s2": ((2, 8, 6, 3), 2, 2, 0, False),
}


def _torch(x: np.ndarray, g: np.ndarray, k, s, p, ceil):
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, k, s, p, ceil_mode=ceil)
    yt.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    return yt.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("xla", [False, True], ids=["jtkd_cpu", "xla_reduce_window"])
@pytest.mark.parametrize("case", CASES)
def test_max_pool_matches_torch_with_ties(case, xla, monkeypatch):
    if xla:
        monkeypatch.setenv("JTKD_CONV", "xla")
    shape, k, s, p, ceil = CASES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    x[0, :4, :4, :] = 0.5  # a plateau: windows with several equal maxima
    x[-1, 1::2, :, 0] = x[-1, ::2, :, 0][: x[-1, 1::2].shape[0]]  # equal values in overlapping rows
    y, vjp = jax.vjp(lambda v: layers.max_pool(v, k, s, p, ceil), jnp.asarray(x))
    g = rng.standard_normal(y.shape).astype(np.float32)
    (dx,) = vjp(jnp.asarray(g))
    ref_y, ref_dx = _torch(x, g, k, s, p, ceil)
    assert y.shape == ref_y.shape
    np.testing.assert_array_equal(y, ref_y)
    if not xla:  # XLA's own select-and-scatter breaks ties its own way; jtkd's must be torch's
        np.testing.assert_allclose(dx, ref_dx, atol=1e-6)
    assert np.isclose(dx.sum(), g.sum(), atol=1e-4)  # every output's gradient lands exactly once


def test_cpu_pool_avoids_reduce_window_and_keeps_dtype():
    x = jnp.ones((2, 9, 9, 4), jnp.bfloat16)
    grad = jax.grad(lambda v: layers.max_pool(v, 3, 2, 1).astype(jnp.float32).sum())
    assert "reduce_window" not in str(jax.make_jaxpr(grad)(x)) and "scatter" not in str(jax.make_jaxpr(grad)(x))
    assert layers.max_pool(x, 3, 2, 1).dtype == jnp.bfloat16 and grad(x).dtype == jnp.bfloat16
