"""`jtkd.models.onednn`: oneDNN convolutions as XLA FFI calls, against XLA's convolution.

The extension is a dependency on Linux x86-64 (pyproject), so these tests build it and fail, not
skip, when it cannot be built.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jtkd.models import layers, onednn
from jtkd.train import AXIS, make_mesh

DN = ("NHWC", "HWIO", "NHWC")

# (input NHWC, kernel HWIO, strides, padding, dilation, groups); odd sizes, asymmetric padding
CASES = {
    "3x3_s2_asym_pad_dil": ((3, 11, 13, 6), (3, 3, 6, 5), (2, 1), ((1, 0), (2, 1)), (1, 2), 1),
    "1x1": ((2, 9, 7, 16), (1, 1, 16, 24), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),
    "1x1_s2": ((2, 9, 7, 16), (1, 1, 16, 20), (2, 2), ((0, 0), (0, 0)), (1, 1), 1),
    "grouped_3x3": ((2, 9, 9, 8), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)), (1, 1), 2),
    "depthwise_5x5_s2": ((2, 9, 10, 8), (5, 5, 1, 8), (2, 2), ((2, 2), (2, 2)), (1, 1), 8),
    "stem_7x7_s2": ((2, 23, 21, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), (1, 1), 1),
}


def _loss(fn, x, w):
    return jnp.sum(jnp.sin(fn(x, w)))


def _xla(case):
    _, _, strides, padding, dilation, groups = CASES[case]
    return functools.partial(jax.lax.conv_general_dilated, window_strides=strides, padding=padding,
                             rhs_dilation=dilation, feature_group_count=groups, dimension_numbers=DN,
                             precision="highest")


def _operands(case, seed=0):
    xs, ws = CASES[case][:2]
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(xs), jnp.float32),
            jnp.asarray(rng.standard_normal(ws) * 0.2, jnp.float32))


@pytest.mark.parametrize("xla_weight_grad", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_xla(case, xla_weight_grad):
    x, w = _operands(case)
    geometry = CASES[case][2:]
    mine = functools.partial(onednn.conv, geometry=geometry, xla_weight_grad=xla_weight_grad)
    out, ref = jax.jit(mine)(x, w), jax.jit(_xla(case))(x, w)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    grads = jax.jit(jax.grad(functools.partial(_loss, mine), argnums=(0, 1)))(x, w)
    ref_grads = jax.jit(jax.grad(functools.partial(_loss, _xla(case)), argnums=(0, 1)))(x, w)
    for name, g, r in zip(("input", "kernel"), grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5, err_msg=f"{name} gradient")
    assert "jtkd_onednn_conv_fwd" in jax.jit(mine).lower(x, w).as_text()


def test_resnet_shapes_get_optimised_kernels():
    """oneDNN's 'ref' implementations are plain loops, 10-100x slower: none of these may get one."""
    for xs, ws, stride in [((8, 56, 56, 64), (1, 1, 64, 256), 1), ((8, 56, 56, 256), (1, 1, 256, 128), 2),
                           ((8, 7, 7, 2048), (1, 1, 2048, 512), 1), ((8, 112, 112, 16), (1, 1, 16, 64), 1)]:
        geometry = ((stride, stride), ((0, 0), (0, 0)), (1, 1), 1)
        for kind in ("fwd", "bwd_data", "bwd_weights"):
            impl = onednn.implementation(kind, xs, ws, geometry)
            assert impl and not impl.startswith(("ref", "error")), (xs, ws, kind, impl)


def test_concurrent_calls_in_one_program():
    """XLA runs independent convolutions at the same time, so each call brings its own scratchpad.
    (With oneDNN's shared one, resnet50's step with oneDNN 3x3 convolutions once hung inside a
    kernel; this smaller program did not reproduce that, so it checks concurrent results only.)"""
    rng = np.random.default_rng(3)
    shapes = [((4, 28, 28, 32 * (i + 1)), (3, 3, 32 * (i + 1), 64)) for i in range(6)]
    xs = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s, _ in shapes]
    ws = [jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for _, s in shapes]
    geometry = ((1, 1), ((1, 1), (1, 1)), (1, 1), 1)

    def many(fn, xs, ws):
        return jax.grad(lambda xs, ws: sum(jnp.sum(jnp.sin(fn(x, w))) for x, w in zip(xs, ws)), argnums=(0, 1))(xs, ws)

    mine = jax.jit(functools.partial(many, functools.partial(onednn.conv, geometry=geometry)))
    ref = many(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                                          precision="highest"), xs, ws)
    for _ in range(5):
        got = mine(xs, ws)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):  # sums of ~3000 products: scale atol
            np.testing.assert_allclose(g, r, atol=3e-6 * float(jnp.abs(r).max()), rtol=1e-5)


def test_sharded_gradient_equals_single_device(four_devices):
    """Under shard_map a replicated kernel's gradient is summed over devices exactly once."""
    x, w = _operands("1x1_s2", seed=1)
    x = jnp.concatenate([x, x[::-1] * 0.5])  # batch 4, one example per device
    geometry = CASES["1x1_s2"][2:]
    loss = functools.partial(_loss, functools.partial(onednn.conv, geometry=geometry))

    def local(x, w):
        return jax.lax.psum(loss(x, w), AXIS)

    sharded = jax.jit(jax.shard_map(jax.grad(local, argnums=1), mesh=make_mesh(4), in_specs=(P(AXIS), P()),
                                    out_specs=P()))
    np.testing.assert_allclose(sharded(x, w), jax.grad(loss, argnums=1)(x, w), atol=1e-4, rtol=1e-5)


def test_layers_conv_routes_1x1_to_onednn_and_the_switch_turns_it_off(monkeypatch):
    x, w = _operands("1x1_s2")
    args = (x, w, (2, 2), ((0, 0), (0, 0)))
    assert onednn.enabled()
    assert "jtkd_onednn_conv_fwd" in jax.jit(lambda x, w: layers.conv(x, w, *args[2:], dimension_numbers=DN)).lower(
        x, w).as_text()
    monkeypatch.setenv("JTKD_ONEDNN", "0")
    text = jax.jit(lambda x, w: layers.conv(x, w, *args[2:], dimension_numbers=DN)).lower(x, w).as_text()
    assert "jtkd_onednn" not in text and "dot_general" in text


def test_mismatched_groups_are_a_clear_error():
    x, w = _operands("grouped_3x3")
    with pytest.raises(Exception, match="do not match the groups"):
        jax.block_until_ready(onednn.conv(x, w, ((1, 1), ((1, 1), (1, 1)), (1, 1), 3)))


def test_missing_onednn_names_the_path(monkeypatch, tmp_path):
    monkeypatch.setenv("JTKD_ONEDNN_ROOT", str(tmp_path))
    with pytest.raises(onednn.OneDNNUnavailable, match=str(tmp_path)):
        onednn._build()


def test_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = onednn._build()
    assert first.parent == tmp_path / "jtkd" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert onednn._build() == first and first.stat().st_mtime_ns == stamp
