"""`layers.conv`, the CPU routing of convolutions to oneDNN and matmuls, against XLA's convolution.

Values and both gradients must agree for every route (depthwise, grouped, 1x1, small maps, dense
convolutions with many output rows) and the fallback; the routed cases must really avoid XLA's
convolution in the forward pass, or the speed-up is gone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtkd.models import layers

DN = ("NHWC", "HWIO", "NHWC")

# (input NHWC, kernel HWIO, stride, padding, dilation, groups, routed: True, False or "onednn" = only with it)
CASES = {
    "depthwise_5x5_s2": ((2, 15, 13, 24), (5, 5, 1, 24), 2, 2, 1, 24, True),
    "depthwise_3x3_dil2": ((2, 11, 9, 16), (3, 3, 1, 16), 1, 2, 2, 16, True),
    "grouped_3x3": ((2, 9, 7, 32), (3, 3, 4, 32), 1, 1, 1, 8, True),
    "grouped_3x3_s2": ((2, 9, 8, 24), (3, 3, 8, 48), 2, 1, 1, 3, True),
    "pointwise_s2": ((2, 9, 7, 16), (1, 1, 16, 20), 2, 0, 1, 1, True),
    "small_map_3x3": ((3, 2, 2, 16), (3, 3, 16, 8), 1, 1, 1, 1, True),
    "small_map_asym_kernel": ((2, 5, 4, 8), (1, 7, 8, 8), 1, (0, 3), 1, 1, True),
    "patches_4x4_s4": ((2, 17, 14, 3), (4, 4, 3, 8), 4, 0, 1, 1, True),  # rows and columns left over
    "patches_16x16_large_map": ((1, 160, 144, 3), (16, 16, 3, 12), 16, 0, 1, 1, True),
    "large_map_3x3": ((1, 17, 15, 8), (3, 3, 8, 8), 1, 1, 1, 1, False),  # 255 output rows: XLA
    "many_rows_3x3": ((2, 17, 15, 8), (3, 3, 8, 8), 1, 1, 1, 1, "onednn"),  # 510 rows
    "many_rows_7x7_s2_dil": ((3, 29, 27, 3), (7, 7, 3, 8), 2, 4, 2, 1, "onednn"),
    "many_rows_small_map": ((40, 8, 8, 8), (3, 3, 8, 8), 1, 1, 1, 1, True),  # matmul without oneDNN
}


def _run(fn, x, w, stride, pad, dil, groups):
    ph, pw = (pad, pad) if isinstance(pad, int) else pad

    def loss(x, w):
        y = fn(x, w, (stride, stride), ((ph, ph), (pw, pw)), rhs_dilation=(dil, dil), dimension_numbers=DN,
               feature_group_count=groups)
        return jnp.sum(jnp.sin(y)), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
    return y, grads, jax.make_jaxpr(loss)(x, w)


@pytest.mark.parametrize("onednn", ["1", "0"])
@pytest.mark.parametrize("case", CASES)
def test_routes_match_xla_convolution(case, onednn, monkeypatch):
    """With oneDNN (depthwise, grouped and 1x1 go there) and without (their matmul fallbacks)."""
    monkeypatch.setenv("JTKD_ONEDNN", onednn)
    xs, ws, stride, pad, dil, groups, routed = CASES[case]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    w = jnp.asarray(rng.standard_normal(ws) * 0.2, jnp.float32)
    with jax.default_matmul_precision("highest"):
        ref, ref_grads, _ = _run(jax.lax.conv_general_dilated, x, w, stride, pad, dil, groups)
        out, grads, jaxpr = _run(layers.conv, x, w, stride, pad, dil, groups)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5)
    assert ("conv_general_dilated" not in str(jaxpr)) == (onednn == "1" if routed == "onednn" else routed)


def test_xla_switch_and_other_backends_use_xla(monkeypatch):
    x, w = jnp.ones((1, 5, 5, 8)), jnp.ones((3, 3, 1, 8))
    args = (x, w, (1, 1), ((1, 1), (1, 1)))
    kw = dict(dimension_numbers=DN, feature_group_count=8)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda: layers.conv(*args, **kw))())
    monkeypatch.setenv("JTKD_CONV", "xla")
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda: layers.conv(*args, **kw))())
    monkeypatch.delenv("JTKD_CONV")
    with layers.xla_operations():  # the same for what is traced inside, and only that
        assert "conv_general_dilated" in str(jax.make_jaxpr(lambda: layers.conv(*args, **kw))())
    assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda: layers.conv(*args, **kw))())
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda: layers.conv(*args, **kw))())


def test_bf16_compute_keeps_dtype_and_value():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 3, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 32)) * 0.1, jnp.bfloat16)
    args = (x, w, (1, 1), ((1, 1), (1, 1)))
    out = layers.conv(*args, dimension_numbers=DN, feature_group_count=8)
    ref = jax.lax.conv_general_dilated(*(a.astype(jnp.float32) if hasattr(a, "astype") else a for a in args),
                                       dimension_numbers=DN, feature_group_count=8)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=0.1, rtol=0.02)
