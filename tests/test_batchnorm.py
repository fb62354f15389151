"""Train-mode BatchNorm and LayerNorm: their hand-written backward (layers._batch_norm, layers._normalize) against torch's
autograd, and BatchNorm synchronised over a 4-device mesh against one device holding the whole batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import PartitionSpec as P

from jtkd.models import layers
from jtkd.train import AXIS, make_mesh


def _data(seed=0, shape=(8, 5, 3, 6)):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)  # off-centre: the mean term matters
    g = rng.standard_normal(shape).astype(np.float32)  # upstream gradient
    scale = (rng.random(shape[-1]) + 0.5).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    return x, g, scale, bias


def _jax_grads(x, g, scale, bias, axis_name=None):
    bn = layers.BatchNorm(momentum=0.1, epsilon=1e-5, axis_name=axis_name)
    stats = {"mean": jnp.zeros(x.shape[-1]), "var": jnp.ones(x.shape[-1])}

    def loss(x, scale, bias):
        y, upd = bn.apply({"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x, train=True,
                          mutable=["batch_stats"])
        return jnp.sum(y * g), (y, upd["batch_stats"])

    (_, (y, new_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    return y, grads, new_stats


def test_backward_matches_torch_autograd():
    x, g, scale, bias = _data()
    y, (dx, dscale, dbias), new_stats = _jax_grads(jnp.asarray(x), jnp.asarray(g), jnp.asarray(scale), jnp.asarray(bias))

    bn = torch.nn.BatchNorm2d(x.shape[-1], momentum=0.1, eps=1e-5).double().train()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(scale))
        bn.bias.copy_(torch.from_numpy(bias))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64)).requires_grad_()
    yt = bn(xt)
    yt.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).astype(np.float64)))
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(nchw(y), yt.detach().numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(nchw(dx), xt.grad.numpy(), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(dscale, bn.weight.grad.numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(dbias, bn.bias.grad.numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(new_stats["mean"], bn.running_mean.numpy(), atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(new_stats["var"], bn.running_var.numpy(), atol=1e-5, rtol=1e-6)


def test_backward_reduces_the_activations_twice():
    """The parameter gradients reuse the input gradient's two reductions (sum g, sum g * xhat): with the
    affine outside the custom VJP, XLA reduces each twice (bench/FINDINGS.md, eleventh session)."""
    x, g, scale, bias = (jnp.asarray(a) for a in _data(3))
    jaxpr = jax.make_jaxpr(lambda *a: _jax_grads(*a)[1])(x, g, scale, bias)

    def full_reductions(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.shape == x.shape:
                n += 1
            n += sum(full_reductions(sub) for sub in jax.core.jaxprs_in_params(eqn.params))
        return n

    # the loss's sum; forward: mean and variance; backward: sum g and sum g * xhat (7 with the affine outside)
    assert full_reductions(jaxpr.jaxpr) == 5


def test_backward_matches_plain_autodiff_for_bf16_inputs():
    """bf16 activations: statistics and the backward run in fp32, as autodiff of the formula would."""
    x, g, scale, bias = _data(1)
    xb = jnp.asarray(x, jnp.bfloat16)

    def ref(x):
        xf = x.astype(jnp.float32)
        mean = xf.mean((0, 1, 2))
        var = jnp.square(xf - mean).mean((0, 1, 2))
        return jnp.sum(((xf - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias) * g)

    want = jax.grad(ref)(xb)
    _, (got, _, _), _ = _jax_grads(xb, jnp.asarray(g), jnp.asarray(scale), jnp.asarray(bias))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)


def test_synchronised_over_four_devices_equals_one_device():
    mesh = make_mesh(4)
    x, g, scale, bias = _data(2, shape=(8, 4, 3, 5))
    y1, grads1, stats1 = _jax_grads(jnp.asarray(x), jnp.asarray(g), jnp.asarray(scale), jnp.asarray(bias))

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P()),
                       out_specs=(P(AXIS), (P(AXIS), P(), P()), P()))
    def sharded(x, g, scale, bias):
        y, (dx, ds, db), stats = _jax_grads(x, g, scale, bias, axis_name=AXIS)
        return y, (dx, ds, db), stats  # replicated-parameter grads come out summed over devices

    y4, grads4, stats4 = sharded(jnp.asarray(x), jnp.asarray(g), jnp.asarray(scale), jnp.asarray(bias))
    np.testing.assert_allclose(y4, y1, atol=1e-5, rtol=0)
    for a, b in zip(grads4, grads1):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    for k in stats1:
        np.testing.assert_allclose(stats4[k], stats1[k], atol=1e-6, rtol=1e-6)


def test_layer_norm_backward_matches_torch_autograd():
    """LayerNorm (ViT, ConvNeXt, Swin, MaxViT) shares the closed-form backward, over the last axis."""
    x, g, scale, bias = _data(2, shape=(3, 7, 5, 24))
    ln = layers.LayerNorm(epsilon=1e-6)

    def loss(x, scale, bias):
        y = ln.apply({"params": {"scale": scale, "bias": bias}}, x)
        return jnp.sum(y * g), y

    (_, y), (dx, dscale, dbias) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    tln = torch.nn.LayerNorm(x.shape[-1], eps=1e-6).double()
    with torch.no_grad():
        tln.weight.copy_(torch.from_numpy(scale))
        tln.bias.copy_(torch.from_numpy(bias))
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    yt = tln(xt)
    yt.backward(torch.from_numpy(g.astype(np.float64)))
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(dscale, tln.weight.grad.numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(dbias, tln.bias.grad.numpy(), atol=1e-4, rtol=1e-5)
