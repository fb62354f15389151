"""`jtkd.models.onednn`: oneDNN convolutions and batched matmuls as XLA FFI calls, against XLA's.

The extension is a dependency on Linux x86-64 (pyproject), so these tests build it and fail, not
skip, when it cannot be built.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jtkd.models import layers, onednn
from jtkd.train import AXIS, make_mesh

DN = ("NHWC", "HWIO", "NHWC")
# The matmul rules of linear layers and small 1x1 convolutions: (oneDNN's ISA is AVX-512, the extension holds MKL)
LINEAR_RULES = {"avx2": (False, True), "avx512_no_mkl": (True, False), "avx512_mkl": (True, True)}

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
    all_three, no_weights = ("fwd", "bwd_data", "bwd_weights"), ("fwd", "bwd_data")
    # (input, kernel, stride, (pad h, pad w), kinds): 1x1 convolutions run all three directions on
    # oneDNN; dense KxK ones only forward and input gradient (their weight gradient is XLA's)
    cases = [((8, 56, 56, 64), (1, 1, 64, 256), 1, (0, 0), all_three),
             ((8, 56, 56, 256), (1, 1, 256, 128), 2, (0, 0), all_three),
             ((8, 7, 7, 2048), (1, 1, 2048, 512), 1, (0, 0), all_three),
             ((8, 112, 112, 16), (1, 1, 16, 64), 1, (0, 0), all_three),
             ((8, 224, 224, 3), (7, 7, 3, 64), 2, (3, 3), no_weights),
             ((8, 56, 56, 64), (3, 3, 64, 64), 1, (1, 1), no_weights),
             ((8, 56, 56, 128), (3, 3, 128, 128), 2, (1, 1), no_weights),
             ((8, 7, 7, 512), (3, 3, 512, 512), 1, (1, 1), no_weights),
             ((8, 17, 17, 128), (1, 7, 128, 192), 1, (0, 3), no_weights)]
    for xs, ws, stride, (ph, pw), kinds in cases:
        geometry = ((stride, stride), ((ph, ph), (pw, pw)), (1, 1), 1)
        for kind in kinds:
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
        # Sums of ~3000 products whose rounding sin' carries into a second sum: atol scales with the
        # largest value. 3e-6 of it held on AVX2; AVX-512's kernels (another summation order) reached
        # 3.6e-6. A scratchpad shared between concurrent calls gives errors of the values' own size.
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(g, r, atol=1e-5 * float(jnp.abs(r).max()), rtol=1e-5)


def _sharded_grad(loss):
    """d(sum over 4 devices of loss(x_shard, w))/dw: x split along its first axis, w replicated."""

    def local(x, w):
        return jax.lax.psum(loss(x, w), AXIS)

    return jax.jit(jax.shard_map(jax.grad(local, argnums=1), mesh=make_mesh(4), in_specs=(P(AXIS), P()),
                                 out_specs=P()))


def test_sharded_gradient_equals_single_device(four_devices):
    """Under shard_map a replicated kernel's gradient is summed over devices exactly once."""
    x, w = _operands("1x1_s2", seed=1)
    x = jnp.concatenate([x, x[::-1] * 0.5])  # batch 4, one example per device
    geometry = CASES["1x1_s2"][2:]
    loss = functools.partial(_loss, functools.partial(onednn.conv, geometry=geometry))
    np.testing.assert_allclose(_sharded_grad(loss)(x, w), jax.grad(loss, argnums=1)(x, w), atol=1e-4, rtol=1e-5)


def test_layers_conv_routes_1x1_to_onednn_and_the_switch_turns_it_off(monkeypatch):
    x, w = _operands("1x1_s2")
    args = (x, w, (2, 2), ((0, 0), (0, 0)))
    assert onednn.enabled()
    assert "jtkd_onednn_conv_fwd" in jax.jit(lambda x, w: layers.conv(x, w, *args[2:], dimension_numbers=DN)).lower(
        x, w).as_text()
    monkeypatch.setenv("JTKD_ONEDNN", "0")
    text = jax.jit(lambda x, w: layers.conv(x, w, *args[2:], dimension_numbers=DN)).lower(x, w).as_text()
    assert "jtkd_onednn" not in text and "dot_general" in text


@pytest.mark.parametrize("avx512", [False, True])
def test_dense_convolutions_weight_gradient_by_isa(avx512, monkeypatch):
    """A dense 3x3 convolution above `_ONEDNN_DENSE_ROWS` rows: forward and input gradient on oneDNN;
    the weight gradient XLA's on AVX2 and oneDNN's with AVX-512; gradients equal XLA's either way."""
    monkeypatch.setattr(onednn, "avx512", lambda: avx512)
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 13, 13, 8)), jnp.float32)  # 338 output rows
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 16)) * 0.1, jnp.float32)
    assert 2 * 13 * 13 >= layers._ONEDNN_DENSE_ROWS

    def loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)))

    grad = jax.jit(jax.grad(functools.partial(loss, layers.conv), argnums=(0, 1)))
    text = grad.lower(x, w).as_text()
    assert "jtkd_onednn_conv_fwd" in text and "jtkd_onednn_conv_bwd_data" in text
    assert ("jtkd_onednn_conv_bwd_weights" in text) == avx512
    ref = jax.grad(functools.partial(loss, functools.partial(jax.lax.conv_general_dilated, precision="highest")),
                   argnums=(0, 1))(x, w)
    for g, r in zip(grad(x, w), ref):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize("rows", ["small", "large"])
def test_1x1_convolutions_on_mkl_for_small_maps(rows, rule, monkeypatch):
    """A stride-1 1x1 convolution: MKL's matmul at most `_MKL_1X1_ROWS` rows where oneDNN has AVX-512 and
    the extension MKL, oneDNN's convolution otherwise (and a strided one always); values and gradients
    equal XLA's convolution."""
    avx512, mkl = LINEAR_RULES[rule]
    monkeypatch.setattr(onednn, "avx512", lambda: avx512)
    monkeypatch.setattr(onednn, "mkl_available", lambda: mkl)
    monkeypatch.setattr(layers, "_MKL_1X1_ROWS", 2 * 9 * 7 if rows == "small" else 2 * 9 * 7 - 1)
    x, w = _operands("1x1")  # 2 x 9 x 7 rows

    def loss(conv, x, w, strides=(1, 1)):
        return jnp.sum(jnp.sin(conv(x, w, strides, ((0, 0), (0, 0)), dimension_numbers=DN)))

    grad = jax.jit(jax.grad(functools.partial(loss, layers.conv), argnums=(0, 1)))
    text = grad.lower(x, w).as_text()
    on_mkl = rule == "avx512_mkl" and rows == "small"
    assert ("jtkd_onednn_mkl_matmul" in text, "jtkd_onednn_conv_fwd" in text) == (on_mkl, not on_mkl)
    strided = jax.jit(jax.grad(functools.partial(loss, layers.conv, strides=(2, 2)), argnums=(0, 1)))
    assert "jtkd_onednn_mkl_matmul" not in strided.lower(x, w).as_text()
    ref = jax.grad(functools.partial(loss, functools.partial(jax.lax.conv_general_dilated, precision="highest")),
                   argnums=(0, 1))(x, w)
    for g, r in zip(grad(x, w), ref):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


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


def _matmul_operands(transpose_a, transpose_b, batch=(2, 3), m=5, k=7, n=4, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((*batch, k, m) if transpose_a else (*batch, m, k))
    b = rng.standard_normal((*batch, n, k) if transpose_b else (*batch, k, n))
    return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


def _reference_matmul(a, b, transpose_a, transpose_b):
    a = jnp.swapaxes(a, -1, -2) if transpose_a else a
    return jnp.matmul(a, jnp.swapaxes(b, -1, -2) if transpose_b else b, precision="highest")


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_batched_matmul_values_and_gradients_match_xla(transpose_a, transpose_b):
    a, b = _matmul_operands(transpose_a, transpose_b)
    mine = functools.partial(layers.batched_matmul, transpose_a=transpose_a, transpose_b=transpose_b)
    ref = functools.partial(_reference_matmul, transpose_a=transpose_a, transpose_b=transpose_b)
    assert "jtkd_onednn_matmul" in jax.jit(mine).lower(a, b).as_text()
    out = jax.jit(mine)(a, b)
    assert out.shape == (2, 3, 5, 4)
    np.testing.assert_allclose(out, ref(a, b), atol=1e-5, rtol=1e-5)
    grads = jax.jit(jax.grad(functools.partial(_loss, mine), argnums=(0, 1)))(a, b)
    ref_grads = jax.grad(functools.partial(_loss, ref), argnums=(0, 1))(a, b)
    for name, g, r in zip(("a", "b"), grads, ref_grads):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"gradient of {name}")


def test_batched_matmul_falls_back_to_xla_when_off_or_not_float32(monkeypatch):
    a, b = _matmul_operands(False, True)
    assert "jtkd_onednn_matmul" not in jax.jit(
        lambda a, b: layers.batched_matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), transpose_b=True)
    ).lower(a, b).as_text()
    with layers.xla_operations():
        assert "jtkd_onednn" not in jax.jit(lambda a, b: layers.batched_matmul(a, b, transpose_b=True)).lower(a, b).as_text()
    monkeypatch.setenv("JTKD_ONEDNN", "0")
    off = jax.jit(lambda a, b: layers.batched_matmul(a, b, transpose_b=True))
    assert "jtkd_onednn" not in off.lower(a, b).as_text()
    np.testing.assert_allclose(off(a, b), _reference_matmul(a, b, False, True), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="batch axes differ"):
        layers.batched_matmul(a, b[:1], transpose_b=True)
    with pytest.raises(ValueError, match="contracted axes differ"):
        layers.batched_matmul(a, b)


def test_batched_matmul_sharded_gradient_equals_single_device(four_devices):
    """A replicated operand's gradient is summed over the devices exactly once, as for XLA's dot."""
    a, b = _matmul_operands(False, True, batch=(4,), seed=2)
    b = b[:1]  # one (n, k) matrix, replicated; each device holds one batch element of a
    loss = functools.partial(_loss, functools.partial(onednn.matmul, transpose_b=True))
    expected = sum(jax.grad(loss, argnums=1)(a[i : i + 1], b) for i in range(4))
    np.testing.assert_allclose(_sharded_grad(loss)(a, b), expected, atol=1e-5, rtol=1e-5)


def test_attention_shapes_get_optimised_matmul_kernels():
    """vit_b_16's (48 x 197x64) and swin_t's (768 x 49x32) attention products, forward and backward."""
    for batch, n, d in [(48, 197, 64), (768, 49, 32)]:
        for a_shape, b_shape, ta, tb in [((batch, n, d), (batch, n, d), False, True),  # q k^T
                                         ((batch, n, n), (batch, n, d), False, False),  # p v, ds k
                                         ((batch, n, n), (batch, n, d), True, False)]:  # p^T dv, ds^T q
            impl = onednn.matmul_implementation(a_shape, b_shape, ta, tb)
            assert impl and not impl.startswith(("ref", "error")), (a_shape, b_shape, ta, tb, impl)


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_linear_on_onednn_or_mkl_matches_xla(transpose_kernel, wide, rule, monkeypatch):
    """`layers.linear` at and above `_ONEDNN_LINEAR_ROWS` rows. AVX2: XLA's forward, oneDNN's gradients
    (x^T g read in place). AVX-512 without MKL: the same, except a wider-than-tall weight gradient (XLA's
    dot). AVX-512 with MKL: MKL's sgemm for the forward and both gradients. Values and both gradients
    against XLA's dot, every rule on any CPU."""
    avx512, mkl = LINEAR_RULES[rule]
    monkeypatch.setattr(onednn, "avx512", lambda: avx512)
    monkeypatch.setattr(onednn, "mkl_available", lambda: mkl)
    rng = np.random.default_rng(3)
    n_out, n_in = (40, 24) if wide != transpose_kernel else (24, 40)  # wide: the stored kernel's 2nd axis larger
    x = jnp.asarray(rng.standard_normal((2, layers._ONEDNN_LINEAR_ROWS // 2 + 3, n_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n_out, n_in) if transpose_kernel else (n_in, n_out)), jnp.float32)
    assert (w.shape[1] > w.shape[0]) == wide
    mine = functools.partial(layers.linear, transpose_kernel=transpose_kernel)

    def ref(x, w):
        return jnp.matmul(x, w.T if transpose_kernel else w, precision="highest")

    text = jax.jit(jax.grad(functools.partial(_loss, mine), argnums=(0, 1))).lower(x, w).as_text()
    if rule == "avx512_mkl":
        assert (text.count("jtkd_onednn_mkl_matmul"), text.count("jtkd_onednn_matmul")) == (3, 0)
    else:  # the input (and weight) gradient
        assert (text.count("jtkd_onednn_mkl_matmul"), text.count("jtkd_onednn_matmul")) == (0, 1 if wide and avx512 else 2)
    np.testing.assert_allclose(jax.jit(mine)(x, w), ref(x, w), atol=1e-5, rtol=1e-5)
    grads = jax.jit(jax.grad(functools.partial(_loss, mine), argnums=(0, 1)))(x, w)
    for name, g, r in zip(("x", "kernel"), grads, jax.grad(functools.partial(_loss, ref), argnums=(0, 1))(x, w)):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5, err_msg=f"gradient of {name}")


@pytest.mark.parametrize("batch", [(), (3,)], ids=["unbatched", "batched"])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_mkl_matmul_values_and_gradients_match_xla(transpose_a, transpose_b, batch):
    """`onednn.matmul(..., library="mkl")`: MKL is a dependency on Linux x86-64, so the extension holds it."""
    assert onednn.mkl_available(), onednn._mkl_flags()
    a, b = _matmul_operands(transpose_a, transpose_b, batch=batch, m=37, k=53, n=29, seed=6)
    mine = functools.partial(onednn.matmul, transpose_a=transpose_a, transpose_b=transpose_b, library="mkl")
    ref = functools.partial(_reference_matmul, transpose_a=transpose_a, transpose_b=transpose_b)
    grad = jax.jit(jax.grad(functools.partial(_loss, mine), argnums=(0, 1)))
    text = grad.lower(a, b).as_text()
    assert (text.count("jtkd_onednn_mkl_matmul"), text.count("jtkd_onednn_matmul")) == (3, 0)
    np.testing.assert_allclose(jax.jit(mine)(a, b), ref(a, b), atol=1e-4, rtol=1e-5)
    for name, g, r in zip(("a", "b"), grad(a, b), jax.grad(functools.partial(_loss, ref), argnums=(0, 1))(a, b)):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5, err_msg=f"gradient of {name}")


def test_mkl_missing_or_unknown_library_is_a_clear_error(monkeypatch, tmp_path):
    a, b = _matmul_operands(False, False)
    with pytest.raises(ValueError, match="library must be one of"):
        onednn.matmul(a, b, library="blas")
    monkeypatch.setattr(onednn, "mkl_available", lambda: False)
    with pytest.raises(onednn.OneDNNUnavailable, match="built without MKL"):
        onednn.matmul(a, b, library="mkl")
    monkeypatch.setenv("JTKD_MKL_ROOT", str(tmp_path))  # no MKL there: the extension is built without it
    assert onednn._mkl_flags() == []
    monkeypatch.delenv("JTKD_MKL_ROOT")
    assert "-DJTKD_WITH_MKL" in onednn._mkl_flags()


def test_avx512_reads_onednns_isa():
    """`onednn.avx512()` follows oneDNN's effective ISA, which ONEDNN_MAX_CPU_ISA caps (a fresh process:
    oneDNN reads it once)."""
    code = "from jtkd.models import onednn; print(onednn.avx512())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    if "ONEDNN_MAX_CPU_ISA" not in os.environ:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
        assert onednn.avx512() == ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags)


def test_linear_routing_threshold_and_dense_layers():
    """Few rows (classifier heads) keep XLA's dot; `layers.Linear` (flax Dense) goes through `linear`."""
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)
    grad = jax.grad(functools.partial(_loss, layers.linear), argnums=(0, 1))
    few = jnp.ones((layers._ONEDNN_LINEAR_ROWS - 1, 24), jnp.float32)
    assert "jtkd_onednn" not in jax.jit(grad).lower(few, w).as_text()
    many = jnp.ones((layers._ONEDNN_LINEAR_ROWS, 24), jnp.float32)
    assert "jtkd_onednn" in jax.jit(grad).lower(many, w).as_text()  # oneDNN's or MKL's matmuls, by ISA
    with layers.xla_operations():
        assert "jtkd_onednn" not in jax.jit(lambda x, w: grad(x, w)).lower(many, w).as_text()
    dense = layers.Linear(16)  # a kernel taller than wide: its gradient is the extension's on every CPU
    v = dense.init(jax.random.key(0), many)
    dgrad = jax.grad(lambda p, x: jnp.sum(dense.apply({"params": p}, x) ** 2))
    assert "jtkd_onednn" in jax.jit(dgrad).lower(v["params"], many).as_text()


@pytest.mark.parametrize("rule", ["avx512_no_mkl", "avx512_mkl"])
@pytest.mark.parametrize("shape", [(16, 8), (16, 24)], ids=["tall", "wide"])
def test_linear_sharded_gradient_equals_single_device(four_devices, shape, rule, monkeypatch):
    """The replicated kernel's gradient is summed over the devices exactly once, as for XLA's dot."""
    monkeypatch.setattr(onednn, "avx512", lambda: True)  # without MKL, the wide kernel's gradient on XLA
    monkeypatch.setattr(onednn, "mkl_available", lambda: LINEAR_RULES[rule][1])
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, layers._ONEDNN_LINEAR_ROWS, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    loss = functools.partial(_loss, layers.linear)
    expected = sum(jax.grad(loss, argnums=1)(x[i : i + 1], w) for i in range(4))
    np.testing.assert_allclose(_sharded_grad(loss)(x, w), expected, atol=1e-4, rtol=1e-5)


# (batch, tokens, heads, head_dim, bias groups) for the fused attention: odd token counts, one head, odd
# head_dim; a bias per head (groups 1, maxvit) and per window (groups 3 of batch 6: swin's windows), both
# with masked (-100) scores; scale 0.3
ATTENTION_CASES = {"vit_like": (2, 37, 4, 16, None), "one_head": (3, 11, 1, 8, None),
                   "odd_head_dim": (1, 50, 3, 7, None), "bias_per_head": (2, 13, 3, 8, 1),
                   "bias_per_window": (6, 9, 2, 8, 3)}


def _reference_attention(qkv, heads, bias=None, scale=None):
    """torch's attention written out: per head softmax(scale q k^T + bias[i % groups]) v, heads joined."""
    b, n, width = qkv.shape
    hd = width // (3 * heads)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, heads, hd), 2, 0)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * (hd**-0.5 if scale is None else scale)
    if bias is not None:
        scores = scores + jnp.tile(bias, (b // bias.shape[0], 1, 1, 1))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v, precision="highest").reshape(b, n, width // 3)


def _qkv(case, seed=7, scale=2.0):
    """qkv, heads and bias (or None) of a case."""
    b, n, h, hd, groups = ATTENTION_CASES[case]
    rng = np.random.default_rng(seed)  # scale 2: softmax rows far from uniform
    qkv = jnp.asarray(rng.standard_normal((b, n, 3 * h * hd)) * scale, jnp.float32)
    if groups is None:
        return qkv, h, None
    # Swin's masks: -100 off the diagonal at random (exp underflows there), on top of a normal bias
    masked = (rng.random((groups, 1, n, n)) < 0.3) & ~np.eye(n, dtype=bool)
    return qkv, h, jnp.asarray(rng.standard_normal((groups, h, n, n)) - 100.0 * masked, jnp.float32)


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_fused_attention_values_and_gradients_match_reference(case):
    """`onednn.attention` (MKL is a dependency on Linux x86-64): one kernel forward, one backward, no matmuls
    or transposes of q, k, v around them, and a forward pass alone keeps no softmax; values and the qkv (and
    bias) gradients against the formula."""
    qkv, h, bias = _qkv(case)
    scale = None if bias is None else 0.3
    mine = lambda x, b: onednn.attention(x, h, b, scale)  # noqa: E731
    ref = lambda x, b: _reference_attention(x, h, b, scale)  # noqa: E731
    loss = lambda f: lambda x, b: jnp.sum(jnp.sin(f(x, b)))  # noqa: E731
    argnums = (0,) if bias is None else (0, 1)
    grad = jax.jit(jax.grad(loss(mine), argnums=argnums))
    text = grad.lower(qkv, bias).as_text()
    assert (text.count("jtkd_onednn_mkl_attention_fwd"), text.count("jtkd_onednn_mkl_attention_bwd")) == (1, 1)
    assert "matmul" not in text and "dot_general" not in text and "@jtkd_onednn_mkl_attention(" not in text
    forward = jax.jit(mine).lower(qkv, bias).as_text()
    assert "@jtkd_onednn_mkl_attention(" in forward and "_attention_fwd" not in forward
    out = jax.jit(mine)(qkv, bias)
    assert out.shape == (qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)
    np.testing.assert_allclose(out, ref(qkv, bias), atol=2e-5, rtol=1e-5)
    for name, g, r in zip(("qkv", "bias"), grad(qkv, bias), jax.grad(loss(ref), argnums=argnums)(qkv, bias)):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-5, err_msg=f"gradient of {name}")


@pytest.mark.parametrize("case", ["vit_like", "bias_per_window"])
def test_layers_attention_routes_to_the_fused_kernel_or_falls_back(case, monkeypatch):
    """float32 on the CPU with MKL: the fused kernel; with dropout, bfloat16, `xla_operations()`, without
    MKL or with `JTKD_ONEDNN=0`: batched matmuls and a softmax. Every route gives the same values."""
    qkv, h, bias = _qkv(case, seed=8)
    fused = "jtkd_onednn_mkl_attention"
    expected = _reference_attention(qkv, h, bias)

    def routed(fn=None):  # a new function each time: jit caches traces by function
        f = jax.jit(fn or (lambda x: layers.attention(x, h, bias)))
        return f.lower(qkv).as_text(), f(qkv)

    text, out = routed()
    assert fused in text
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    text, out = routed(lambda x: layers.attention(x, h, bias, dropout=lambda a: a * 1.0))
    assert fused not in text and "jtkd_onednn_matmul" in text
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    text, out = routed(lambda x: layers.attention(x.astype(jnp.bfloat16), h, bias))
    assert fused not in text and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=0.1)
    with layers.xla_operations():
        text, out = routed()
    assert "jtkd_onednn" not in text
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    with monkeypatch.context() as m:
        m.setattr(onednn, "mkl_available", lambda: False)
        text, out = routed()
        assert fused not in text and "jtkd_onednn_matmul" in text
        np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    monkeypatch.setenv("JTKD_ONEDNN", "0")
    text, out = routed()
    assert "jtkd_onednn" not in text
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)


def test_vit_self_attention_uses_the_fused_kernel_and_dropout_falls_back():
    from jtkd.models.vit import MultiheadAttention

    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 13, 24)), jnp.float32)
    mha = MultiheadAttention(num_heads=3, attention_dropout=0.5)
    variables = mha.init(jax.random.key(0), x)
    assert "jtkd_onednn_mkl_attention" in jax.jit(mha.apply).lower(variables, x).as_text()
    train = jax.jit(lambda v, x: mha.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)}))
    assert "jtkd_onednn_mkl_attention" not in train.lower(variables, x).as_text()
    assert not np.allclose(train(variables, x), mha.apply(variables, x))  # dropout is on


def test_fused_attention_sharded_gradients_equal_single_device(four_devices):
    """qkv varies over the devices; a replicated scale on it and a replicated bias get their gradients summed
    exactly once."""
    qkv, h, bias = _qkv("bias_per_head", seed=10)
    qkv = jnp.concatenate([qkv, qkv * 0.5])  # batch 4, one example per device
    w = jnp.linspace(0.5, 1.5, qkv.shape[-1], dtype=jnp.float32)
    loss = lambda x, wb: jnp.sum(jnp.sin(onednn.attention(x * wb[0], h, wb[1])))  # noqa: E731
    expected = [sum(g) for g in zip(*(jax.grad(loss, argnums=1)(qkv[i : i + 1], (w, bias)) for i in range(4)))]
    for got, want in zip(_sharded_grad(loss)(qkv, (w, bias)), expected):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_fused_attention_bad_input_is_a_clear_error(monkeypatch):
    qkv, _, _ = _qkv("vit_like")
    for fn in (onednn.attention, layers.attention):
        with pytest.raises(ValueError, match=r"qkv must be \(batch, tokens, 3 \* 5 heads"):
            fn(qkv, 5)
        with pytest.raises(ValueError, match="qkv must be"):
            fn(qkv[0], 4)
        for shape in [(1, 4, 37, 36), (3, 4, 37, 37), (0, 4, 37, 37), (4, 37, 37)]:  # 3 groups of batch 2
            with pytest.raises(ValueError, match=r"bias must be \(groups, 4, 37, 37\)"):
                fn(qkv, 4, jnp.zeros(shape))
    with pytest.raises(ValueError, match="takes float32 qkv, got bfloat16"):
        onednn.attention(qkv.astype(jnp.bfloat16), 4)
    monkeypatch.setattr(onednn, "mkl_available", lambda: False)
    with pytest.raises(onednn.OneDNNUnavailable, match="built without MKL"):
        onednn.attention(qkv, 4)


def test_fused_attention_concurrent_and_deterministic():
    """Independent attention calls in one program (XLA may run them at once, each with its own OpenMP team)
    give the reference values, and repeated runs give bitwise the same values and gradients."""
    cases = [_qkv(c, seed=20 + i) for i, c in enumerate(["vit_like", "bias_per_head", "bias_per_window"])]
    qkvs, biases = [c[0] for c in cases], [c[2] for c in cases]
    heads = [c[1] for c in cases]

    def total(fn, qkvs, biases):
        return sum(jnp.sum(jnp.sin(fn(x, h, b))) for x, h, b in zip(qkvs, heads, biases))

    grad = jax.jit(jax.grad(functools.partial(total, onednn.attention), argnums=(0, 1)))
    ref = jax.grad(functools.partial(total, _reference_attention), argnums=(0, 1))(qkvs, biases)
    first = grad(qkvs, biases)
    for g, r in zip(jax.tree.leaves(first), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=1e-5)
    for _ in range(3):
        for g, f in zip(jax.tree.leaves(grad(qkvs, biases)), jax.tree.leaves(first)):
            np.testing.assert_array_equal(g, f)
