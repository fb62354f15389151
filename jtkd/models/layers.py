"""Building blocks that reproduce torch.nn semantics in Flax (NHWC).

Every architecture in `jtkd.models` is built from these, so the torch quirks that matter for
numerical parity live in one place: explicit symmetric padding, torch's BatchNorm update rule
(unbiased running variance, momentum convention), `ceil_mode` pooling, adaptive pooling at any
input size, and the NCHW flatten order in front of fully connected classifiers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtkd.models import onednn

Dtype = Any
ModuleDef = Callable[..., nn.Module]

# torch's default inits, so that models trained from scratch here start where torchvision's do.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # conv, torchvision style
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # nn.Linear default


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# Output maps up to this many pixels run as one matmul over shifted slices on CPU (see `conv`).
_SMALL_MAP = 64
# Dense KxK float32 convolutions with at least this many output rows (batch x pixels) run forward and
# input gradient on oneDNN on CPU; below it oneDNN's fixed cost loses to the matmul (bench/FINDINGS.md).
_ONEDNN_DENSE_ROWS = 300
# Float32 linear layers with at least this many rows (batch x tokens) take their gradients from oneDNN on
# CPU; below it oneDNN's fixed cost loses to XLA's dot (bench/FINDINGS.md).
_ONEDNN_LINEAR_ROWS = 200
# Stride-1 1x1 float32 convolutions with at most this many rows run as MKL matmuls where linear layers do
# (AVX-512 with MKL); oneDNN's 1x1 kernels are the faster ones on larger maps (bench/FINDINGS.md).
_MKL_1X1_ROWS = 2048


_XLA_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("jtkd_xla_only", default=False)


@contextlib.contextmanager
def xla_operations() -> Iterator[None]:
    """Models traced inside use XLA's own convolution and pooling on every backend, as `JTKD_CONV=xla`
    does for the process: e.g. to count a model's FLOPs, which XLA cannot see inside oneDNN calls."""
    token = _XLA_ONLY.set(True)
    try:
        yield
    finally:
        _XLA_ONLY.reset(token)


def _cpu_routing() -> bool:
    """Whether to use jtkd's CPU formulations of convolution and pooling (`JTKD_CONV=xla` or
    `xla_operations()`: never)."""
    return (jax.default_backend() == "cpu" and os.environ.get("JTKD_CONV", "auto") != "xla"
            and not _XLA_ONLY.get())


def _mkl_matmuls() -> bool:
    """Whether linear layers and small 1x1 convolutions run on MKL's sgemm: where oneDNN runs AVX-512 and the
    extension holds MKL (on AVX2 oneDNN's matmul was as fast; bench/FINDINGS.md)."""
    return onednn.avx512() and onednn.mkl_available()


def _shifted_slices(x: jax.Array, kernel: tuple[int, int], strides: Sequence[int],
                    padding: Sequence[tuple[int, int]], dilation: Sequence[int], pad_value: float = 0.0) -> list[jax.Array]:
    """The kh*kw strided windows of the padded NHWC input, each of the output's spatial shape."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    ho = onednn.conv_out_size(x.shape[1], kh, sh, padding[0], dh)
    wo = onednn.conv_out_size(x.shape[2], kw, sw, padding[1], dw)
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)), constant_values=pad_value)
    n, c = x.shape[0], x.shape[3]
    return [
        jax.lax.slice(x, (0, i * dh, j * dw, 0), (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)
    ]


def _unshift(v: jax.Array, index: int, kernel: tuple[int, int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]], dilation: Sequence[int], in_hw: tuple[int, int]) -> jax.Array:
    """Transpose of `_shifted_slices(...)[index]`: v (output-shaped) back onto the unpadded input grid,
    as one interior/edge padding (negative edges crop what fell on the padding)."""
    (_, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    top, left = (index // kw) * dh - padding[0][0], (index % kw) * dw - padding[1][0]
    (h, w), (ho, wo) = in_hw, v.shape[1:3]
    return jax.lax.pad(v, jnp.zeros((), v.dtype), ((0, 0, 0), (top, h - top - (ho - 1) * sh - 1, sh - 1),
                                                   (left, w - left - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)))


def conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kw: Any,
) -> jax.Array:
    """`lax.conv_general_dilated` for NHWC/HWIO, routing the shapes XLA:CPU handles badly to matmuls.

    On CPU (see bench/FINDINGS.md) XLA runs depthwise convolutions' weight gradients as dense C x C
    convolutions, runs grouped convolutions 30-100x slower than a batched matmul, swaps the operands of 3x3 convolutions on maps smaller than the kernel into a
    generic loop, and is slower than a plain dot for 1x1 convolutions. Those cases are computed here
    as sums/matmuls over the kh*kw shifted input windows (patch embeddings, stride = kernel, as one
    reshape), which is the same sum in another order
    (differences at float rounding level) and 2-40x faster there, forward and backward. Depthwise,
    grouped and 1x1 float32 convolutions go to oneDNN instead (`jtkd.models.onednn`, FFI custom
    calls) where it is available, which is 2-5x faster still; the matmul formulations are the
    fallback. Dense float32 convolutions with at least `_ONEDNN_DENSE_ROWS` output rows run their
    forward and input gradient on oneDNN too, their weight gradient on XLA (oneDNN's with AVX-512).
    With AVX-512 and MKL, stride-1 1x1 convolutions on at most `_MKL_1X1_ROWS` rows are MKL matmuls.
    Everything else, and every other backend, calls XLA's convolution. `JTKD_CONV=xla` turns all of this off;
    `JTKD_ONEDNN=0` only the oneDNN part.
    """
    xla = partial(jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                  feature_group_count=feature_group_count, precision=precision, **kw)
    dilation = tuple(rhs_dilation or (1, 1))
    if (not _cpu_routing() or kw
            or any(d != 1 for d in (lhs_dilation or ())) or isinstance(padding, str) or lhs.ndim != 4
            or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))):
        return xla()
    kh, kw_, cin, cout = rhs.shape
    c = lhs.shape[-1]
    windows = partial(_shifted_slices, kernel=(kh, kw_), strides=window_strides, padding=padding, dilation=dilation)
    use_onednn = lhs.dtype == rhs.dtype == jnp.float32 and onednn.enabled()
    geometry = (tuple(window_strides), tuple(tuple(p) for p in padding), dilation, feature_group_count)
    if (use_onednn and kh * kw_ == 1 and feature_group_count == 1 and tuple(window_strides) == (1, 1)
            and all(tuple(p) == (0, 0) for p in padding) and math.prod(lhs.shape[:3]) <= _MKL_1X1_ROWS
            and _mkl_matmuls()):
        # MKL: resnet50's 7x7 and 14x14 maps 1.3-1.6x oneDNN's (resnet50 64 px: 0.365 -> 0.317 s a step)
        return onednn.matmul(lhs.reshape(-1, cin), rhs.reshape(cin, cout), library="mkl").reshape(*lhs.shape[:3], cout)
    if use_onednn and (feature_group_count > 1 or kh * kw_ == 1):
        # oneDNN: depthwise 5x, grouped 2-5x faster than the formulations below, forward + both gradients;
        # 1x1: reads NHWC in place for the weight gradient, where XLA's dot writes a transposed copy
        return onednn.conv(lhs, rhs, geometry)
    if feature_group_count == c and cin == 1 and cout == c:  # depthwise
        return sum(col * rhs[i // kw_, i % kw_, 0] for i, col in enumerate(windows(lhs)))
    g = feature_group_count
    n, h, w, _ = lhs.shape
    ho = onednn.conv_out_size(h, kh, window_strides[0], padding[0], dilation[0])
    wo = onednn.conv_out_size(w, kw_, window_strides[1], padding[1], dilation[1])
    if g > 1:  # grouped (ResNeXt, RegNet): one batched matmul, groups leading so only x and y are transposed
        xg = lhs.reshape(n, h, w, g, cin).transpose(3, 0, 1, 2, 4).reshape(g * n, h, w, cin)
        patches = jnp.concatenate(windows(xg), axis=-1).reshape(g, n * ho * wo, kh * kw_ * cin)
        wg = rhs.reshape(kh * kw_ * cin, g, cout // g).transpose(1, 0, 2)
        out = jnp.einsum("gpk,gko->gpo", patches, wg, precision=precision)
        return out.reshape(g, n, ho, wo, cout // g).transpose(1, 2, 3, 0, 4).reshape(n, ho, wo, cout)
    if ((kh, kw_) == tuple(window_strides) and dilation == (1, 1)
            and all(tuple(p) == (0, 0) for p in padding)):  # non-overlapping patches (ViT, Swin, ConvNeXt stems)
        # a reshape, not kh*kw slices: vit_b_32's 32x32 patches as 1024 slices took 25 s to compile
        x = lhs[:, : ho * kh, : wo * kw_].reshape(n, ho, kh, wo, kw_, c).transpose(0, 1, 3, 2, 4, 5)
        return jnp.dot(x.reshape(n, ho, wo, kh * kw_ * c), rhs.reshape(kh * kw_ * cin, cout), precision=precision)
    if use_onednn and n * ho * wo >= _ONEDNN_DENSE_ROWS:
        # forward and input gradient: oneDNN's are 1.0-1.45x XLA's on resnet's 3x3 shapes. Its NHWC weight
        # gradient is 1.5-2.5x slower than XLA's on AVX2, so that one stays with XLA there; with AVX-512
        # it is the faster (resnet18 224 px: 13% off the step, resnet50 9%; bench/FINDINGS.md).
        return onednn.conv(lhs, rhs, geometry, xla_weight_grad=not onednn.avx512())
    if kh * kw_ > 1 and ho * wo > _SMALL_MAP:
        return xla()
    cols = windows(lhs)
    patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
    return jnp.dot(patches, rhs.reshape(kh * kw_ * cin, cout), precision=precision)


def batched_matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """op(a) @ op(b) over matching leading batch axes; op swaps the last two axes when asked.

    On the CPU in float32 this is oneDNN's batched matmul, reading transposed operands in place:
    XLA:CPU runs attention's small batched dots (48 x 197x64x197 in vit_b_16) at about half its
    speed and copies a transposed operand first (bench/FINDINGS.md)."""
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"batched_matmul: batch axes differ, {a.shape} and {b.shape}")
    if a.shape[-2 if transpose_a else -1] != b.shape[-1 if transpose_b else -2]:
        raise ValueError(f"batched_matmul: contracted axes differ, {a.shape} and {b.shape} "
                         f"(transpose_a={transpose_a}, transpose_b={transpose_b})")
    if _cpu_routing() and a.dtype == b.dtype == jnp.float32 and onednn.enabled():
        out = onednn.matmul(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), transpose_a, transpose_b)
        return out.reshape(*a.shape[:-2], *out.shape[-2:])
    return jnp.matmul(jnp.swapaxes(a, -1, -2) if transpose_a else a, jnp.swapaxes(b, -1, -2) if transpose_b else b)


def attention(qkv: jax.Array, num_heads: int, bias: jax.Array | None = None, scale: float | None = None,
              dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """Self-attention softmax(scale q k^T + bias) v for every head, from a packed qkv of shape (batch, tokens,
    3 * num_heads * head_dim) laid out as torch's in_proj writes it; returns (batch, tokens, num_heads *
    head_dim), the heads side by side. `scale` defaults to 1 / sqrt(head_dim); `bias` (groups, num_heads,
    tokens, tokens) joins the scores of batch element i as bias[i % groups]; `dropout`, if given, applies to
    the attention weights.

    On the CPU in float32 with MKL (and no dropout) this is one fused kernel per (batch, head) forward and
    backward (`onednn.attention`): vit_b_16's attention forward + backward 15.9 -> 9.3 ms a layer, torch's
    flash attention 16.6 ms (bench/FINDINGS.md). Elsewhere: two batched matmuls and a softmax, in float32."""
    onednn.check_attention(qkv, num_heads, bias)
    if dropout is None and _fused_attention(qkv):
        return onednn.attention(qkv, num_heads, bias, scale)
    b, n, width = qkv.shape
    head_dim = width // (3 * num_heads)
    # Head-major (3, b, h, n, hd): each head's q, k, v contiguous for the batched matmuls. split, not
    # qkv[i]: the gradient is one concatenate, where indexing's is three padded copies summed.
    q, k, v = (t[0] for t in jnp.split(qkv.reshape(b, n, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4), 3))
    scores = batched_matmul(q * (head_dim**-0.5 if scale is None else scale), k, transpose_b=True)
    if bias is not None:
        groups = bias.shape[0]
        scores = (scores.reshape(b // groups, groups, num_heads, n, n) + bias).reshape(b, num_heads, n, n)
    attn = softmax(scores.astype(jnp.float32), axis=-1).astype(qkv.dtype)
    if dropout is not None:
        attn = dropout(attn)
    return batched_matmul(attn, v).transpose(0, 2, 1, 3).reshape(b, n, width // 3)


def _fused_attention(qkv: jax.Array) -> bool:
    """Whether `attention` runs MKL's fused kernel: on the CPU in float32 where the extension holds MKL (with
    AVX-512, and with both libraries capped at AVX2: 14.1 against 21.8 ms; bench/FINDINGS.md)."""
    return _cpu_routing() and qkv.dtype == jnp.float32 and onednn.enabled() and onednn.mkl_available()


def Conv2d(
    features: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    groups: int = 1,
    dilation: int | Sequence[int] = 1,
    bias: bool = True,
    dtype: Dtype = jnp.float32,
    kernel_init: Callable = kaiming_fan_out,
    name: str | None = None,
) -> nn.Conv:
    """`torch.nn.Conv2d` with torch's argument names; padding is explicit and symmetric (never 'SAME')."""
    ph, pw = _pair(padding)
    return nn.Conv(
        features,
        _pair(kernel_size),
        strides=_pair(stride),
        padding=((ph, ph), (pw, pw)),
        kernel_dilation=_pair(dilation),
        feature_group_count=groups,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        conv_general_dilated=conv,
        name=name,
    )


def Linear(
    features: int,
    bias: bool = True,
    dtype: Dtype = jnp.float32,
    kernel_init: Callable = torch_linear_init,
    name: str | None = None,
) -> nn.Dense:
    """`torch.nn.Linear`; the kernel is stored (in, out), the transpose of torch's weight."""
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                    dot_general=_dense_dot_general, name=name)


def linear(x: jax.Array, kernel: jax.Array, transpose_kernel: bool = False) -> jax.Array:
    """x @ kernel over x's last axis; kernel is (in, out), or torch's (out, in) with `transpose_kernel`.

    On the CPU in float32 with at least `_ONEDNN_LINEAR_ROWS` rows, the gradients are oneDNN's matmuls,
    which read transposed operands in place: the weight gradient contracts over the rows (x^T g), and
    XLA:CPU's dots (YNNPACK) first copy a transposed operand for it (vit_b_16: ~0.25 s a step). The
    forward stays XLA's, which fuses what comes before and after it. Where oneDNN runs AVX-512 and the
    extension holds MKL (`onednn.mkl_available`), the forward and both gradients are MKL's sgemm.
    """
    rows = math.prod(x.shape[:-1])
    if not (_cpu_routing() and x.dtype == kernel.dtype == jnp.float32 and rows >= _ONEDNN_LINEAR_ROWS
            and onednn.enabled()):
        return x @ (kernel.T if transpose_kernel else kernel)
    x2 = x.reshape(rows, x.shape[-1])
    if _mkl_matmuls():
        # MKL's sgemm, forward and both gradients: with AVX-512 it runs every vit_b_16 linear at ~300 GFLOP/s
        # on 2 cores, where XLA's dot and oneDNN's brgemm fall to 250 and 105-195 on wide outputs
        # (vit_b_16 step 1.947 -> 1.869 s, swin_t 0.792 -> 0.761, convnext_tiny 0.762 -> 0.723; bench/FINDINGS.md)
        y = onednn.matmul(x2, kernel, False, transpose_kernel, library="mkl")
    else:
        y = _linear(*onednn.match_varying(x2, kernel), transpose_kernel)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                       preferred_element_type: Any = None, **kw: Any) -> jax.Array:
    """`nn.Dense`'s contraction (last axis of the input with the kernel's first) through `linear`."""
    if dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and preferred_element_type is None and not kw:
        return linear(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x: jax.Array, w: jax.Array, transpose_w: bool) -> jax.Array:
    return x @ (w.T if transpose_w else w)


def _linear_fwd(x, w, transpose_w):
    return _linear(x, w, transpose_w), (x, w)


def _linear_bwd(transpose_w, res, g):
    x, w = res
    # A weight gradient wider than tall is XLA's dot with AVX-512: oneDNN's AVX-512 matmul reading its
    # (rows x wide) operand runs at half speed there (x^T g at 768x788 @ 788x3072: 21 ms, XLA 14.5, torch
    # 12); on AVX2 oneDNN's was the faster of the two (bench/FINDINGS.md).
    wide = w.shape[1] > w.shape[0]
    return onednn.matmul_grads(x, w, g, transpose_b=transpose_w, xla_b_grad=wide and onednn.avx512())


_linear.defvjp(_linear_fwd, _linear_bwd)


class BatchNorm(nn.Module):
    """`torch.nn.BatchNorm{1,2}d` over the last axis.

    train=True normalises with the biased batch variance and updates
        running_mean <- (1 - momentum) * running_mean + momentum * mean
        running_var  <- (1 - momentum) * running_var  + momentum * var * n / (n - 1)
    exactly as torch does (torch's `momentum` is the weight of the new value, flax's is `1 - momentum`).
    With `axis_name` the statistics are averaged over that mesh axis (synchronised BatchNorm; equal
    per-device batches), so a sharded step matches one device holding the whole batch.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # statistics in fp32 at least (bf16 training)
        if train:
            axes = tuple(range(x.ndim - 1))
            n = math.prod(x.shape[:-1])
            if self.axis_name is not None:
                n = n * jax.lax.psum(1, self.axis_name)
            y, mean, var = _batch_norm(*onednn.match_varying(xf, scale, bias), axes, self.axis_name, self.epsilon)
            mean, var = mean.reshape(c), var.reshape(c)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = ((1 - m) * ra_mean.value + m * mean).astype(ra_mean.value.dtype)
                ra_var.value = ((1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))).astype(ra_var.value.dtype)
            return y.astype(self.dtype)
        xhat = (xf - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
        return (xhat * scale + bias).astype(self.dtype)


def _batch_mean(v: jax.Array, axes: tuple[int, ...], axis_name: str | None) -> jax.Array:
    m = v.mean(axes, keepdims=True)
    return m if axis_name is None else jax.lax.pmean(m, axis_name)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _normalize(x: jax.Array, axes: tuple[int, ...], axis_name: str | None, eps: float) -> tuple[jax.Array, ...]:
    """(x - mean) / sqrt(var + eps) with (biased, two-pass) statistics over `axes` (kept as size-1 dims),
    and those statistics: each row's for LayerNorm; BatchNorm (`_batch_norm`) shares the forward over
    all axes but channels.

    A custom VJP because autodiff through mean and variance costs several passes over the activations
    (and, in a transformer, lets XLA fuse the residual stream's gradient into every layer's LayerNorm
    backward, recomputing it per layer); the closed form
        dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps)
    needs two reductions and one elementwise pass (2-3.5x faster on CPU, bench/FINDINGS.md). The
    statistics are returned for BatchNorm's running averages only and carry no gradient.
    """
    return _normalize_fwd(x, axes, axis_name, eps)[0]


def _normalize_fwd(x: jax.Array, axes: tuple[int, ...], axis_name: str | None, eps: float):
    mean = _batch_mean(x, axes, axis_name)
    var = _batch_mean(jnp.square(x - mean), axes, axis_name)  # two-pass, as torch
    inv = jax.lax.rsqrt(var + eps)
    xhat = (x - mean) * inv
    return (xhat, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)), (xhat, inv)


def _normalize_bwd(axes: tuple[int, ...], axis_name: str | None, eps: float, res: tuple, cts: tuple) -> tuple[jax.Array]:
    xhat, inv = res
    g = cts[0]  # cotangents of the returned statistics are zero: they only feed the running averages
    return (inv * (g - _batch_mean(g, axes, axis_name) - xhat * _batch_mean(g * xhat, axes, axis_name)),)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, axes: tuple[int, ...], axis_name: str | None,
                eps: float) -> tuple[jax.Array, ...]:
    """Train-mode BatchNorm, xhat * scale + bias with xhat as in `_normalize`, and the batch statistics.

    The affine is inside the custom VJP because its parameter gradients are the same two reductions
    the input gradient needs, d(bias) = sum(g) and d(scale) = sum(g * xhat):
        dx = scale / sqrt(var + eps) * (g - mean(g) - xhat * mean(g * xhat))
    Outside, XLA reduces g and g * xhat twice each (once per parameter, once more scaled by `scale`
    for dx): two extra passes over every BatchNorm's activations in the backward.
    """
    return _batch_norm_fwd(x, scale, bias, axes, axis_name, eps)[0]


def _batch_norm_fwd(x, scale, bias, axes, axis_name, eps):
    (xhat, mean, var), (_, inv) = _normalize_fwd(x, axes, axis_name, eps)
    return (xhat * scale + bias, mean, var), (xhat, inv, scale)


def _batch_norm_bwd(axes, axis_name, eps, res, cts):
    xhat, inv, scale = res
    g = cts[0]
    dbias, dscale = g.sum(axes, keepdims=True), (g * xhat).sum(axes, keepdims=True)
    n = math.prod(g.shape[a] for a in axes)
    mean_g, mean_gx = dbias / n, dscale / n
    if axis_name is not None:
        mean_g, mean_gx = jax.lax.pmean((mean_g, mean_gx), axis_name)
    dx = (scale * inv) * (g - mean_g - xhat * mean_gx)
    return dx, dscale.reshape(scale.shape), dbias.reshape(scale.shape)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm` over the last axis (torch's default eps is 1e-5, flax's is 1e-6)."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xhat = _normalize(x.astype(jnp.float32), (x.ndim - 1,), None, self.epsilon)[0]
        return (xhat * scale + bias).astype(self.dtype)


def _pool_padding(n: int, k: int, s: int, p: int, ceil_mode: bool) -> tuple[int, int]:
    """Left/right padding giving torch's output size, including its ceil_mode rule."""
    if not ceil_mode:
        return (p, p)
    out = -(-(n + 2 * p - k) // s) + 1
    if (out - 1) * s >= n + p:  # torch: the last window must start inside the input or left padding
        out -= 1
    return (p, p + max((out - 1) * s + k - (n + 2 * p), 0))


def max_pool(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    ceil_mode: bool = False,
) -> jax.Array:
    """`torch.nn.MaxPool2d` (padding is -inf, so it never wins)."""
    k, s, p = _pair(kernel_size), _pair(stride if stride is not None else kernel_size), _pair(padding)
    pads = tuple(_pool_padding(x.shape[1 + i], k[i], s[i], p[i], ceil_mode) for i in range(2))
    if _cpu_routing():
        return _window_max(x, k, s, pads)
    return nn.max_pool(x, k, s, padding=pads)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _window_max(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int], pads: tuple) -> jax.Array:
    """Max over the kh*kw strided windows (CPU). XLA:CPU's reduce-window max keeps four int32 index
    tensors for its gradient and runs on one thread; this is one elementwise pass each way. The
    gradient goes to the first maximum in row-major window order, as torch's does."""
    return functools.reduce(jnp.maximum, _shifted_slices(x, kernel, strides, pads, (1, 1), -jnp.inf))


def _window_max_fwd(x, kernel, strides, pads):
    out = _window_max(x, kernel, strides, pads)
    return out, (x, out)


def _window_max_bwd(kernel, strides, pads, res, g):
    x, out = res
    taken, dx = jnp.zeros(out.shape, bool), jnp.zeros(x.shape, g.dtype)
    for i, window in enumerate(_shifted_slices(x, kernel, strides, pads, (1, 1), -jnp.inf)):
        first = (window == out) & ~taken
        taken = taken | first
        dx = dx + _unshift(jnp.where(first, g, jnp.zeros((), g.dtype)), i, kernel, strides, pads, (1, 1), x.shape[1:3])
    return (dx,)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)


def avg_pool(
    x: jax.Array,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    count_include_pad: bool = True,
) -> jax.Array:
    """`torch.nn.AvgPool2d` (floor mode)."""
    k, s, p = _pair(kernel_size), _pair(stride if stride is not None else kernel_size), _pair(padding)
    return nn.avg_pool(x, k, s, padding=((p[0], p[0]), (p[1], p[1])), count_include_pad=count_include_pad)


def _adaptive_axis(x: jax.Array, axis: int, out: int, reduce: Callable) -> jax.Array:
    n = x.shape[axis]
    if n == out:
        return x
    if n % out == 0:
        shape = x.shape[:axis] + (out, n // out) + x.shape[axis + 1 :]
        return reduce(x.reshape(shape), axis + 1)
    # torch's bins: [floor(i*n/out), ceil((i+1)*n/out)), possibly overlapping
    bins = [(i * n // out, -(-((i + 1) * n) // out)) for i in range(out)]
    return jnp.stack([reduce(jax.lax.slice_in_dim(x, a, b, axis=axis), axis) for a, b in bins], axis=axis)


def adaptive_avg_pool(x: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
    """`torch.nn.AdaptiveAvgPool2d` at any input size (the bins are separable, so pool H then W)."""
    oh, ow = _pair(output_size)
    x = _adaptive_axis(x, 1, oh, lambda v, a: v.mean(a))
    return _adaptive_axis(x, 2, ow, lambda v, a: v.mean(a))


def adaptive_max_pool(x: jax.Array, output_size: int | Sequence[int]) -> jax.Array:
    oh, ow = _pair(output_size)
    x = _adaptive_axis(x, 1, oh, lambda v, a: v.max(a))
    return _adaptive_axis(x, 2, ow, lambda v, a: v.max(a))


def torch_flatten(x: jax.Array) -> jax.Array:
    """`torch.flatten(x, 1)` of an NCHW tensor, from NHWC: fully connected layers after it see torch's order."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def dropout(mod: nn.Module, x: jax.Array, rate: float, train: bool, name: str | None = None) -> jax.Array:
    """nn.Dropout that needs a 'dropout' rng only when it is active."""
    if rate == 0.0 or not train:
        return x
    return nn.Dropout(rate, deterministic=False, name=name)(x)


def active_dropout(mod: nn.Module, rate: float, train: bool) -> Callable[[jax.Array], jax.Array] | None:
    """`dropout` as a function of its input where it is active, else None (`attention`'s `dropout`)."""
    return partial(dropout, mod, rate=rate, train=train) if train and rate > 0 else None


def stochastic_depth(mod: nn.Module, x: jax.Array, p: float, train: bool) -> jax.Array:
    """`torchvision.ops.StochasticDepth(p, 'row')`: drop whole samples of a residual branch."""
    if p == 0.0 or not train:
        return x
    keep = 1.0 - p
    mask = jax.random.bernoulli(mod.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """`torch.nn.GELU()`, the exact one: x * Phi(x) with Phi(x) = (1 + erf(x / sqrt(2))) / 2, the form
    torch evaluates. `jax.nn.gelu(approximate=False)` uses erfc instead, which XLA:CPU expands with an
    exp: forward + backward 9.1 ms against 4.8 ms here at vit_b_16's 4x197x3072 (torch: 5.8 ms)."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))  # Python floats keep x's dtype


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """`jax.nn.softmax`, y = exp(x - max x) / sum exp(x - max x), with the backward written from y alone:
    dx = y * (g - sum(g * y)). Differentiating through the division made XLA:CPU materialise two
    broadcasts of 1 / sum at the scores' full size (vit_b_16: forward + backward 4.0 -> 2.5-2.7 ms a
    layer at 48x197x197)."""
    return jax.nn.softmax(x, axis=axis)


def _softmax_fwd(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    y = jax.nn.softmax(x, axis=axis)
    return y, y


def _softmax_bwd(axis: int, y: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (y * (g - jnp.sum(g * y, axis=axis, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)

relu6 = jax.nn.relu6
hardswish = jax.nn.hard_swish
silu = jax.nn.silu


def hardsigmoid(x: jax.Array) -> jax.Array:
    """`torch.nn.Hardsigmoid`: relu6(x + 3) / 6, with torch's gradient at the kinks (0 at x = +-3,
    where `jnp.clip` would give half the slope)."""
    return jnp.where(x <= -3.0, 0.0, jnp.where(x >= 3.0, 1.0, x / 6.0 + 0.5)).astype(x.dtype)


FEATURE_PREFIX = "feature:"


def collect_features(tree: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Flatten a 'features' collection ({scope: {... name: (value,)}}) to {name: value}.

    Nested scopes are walked (e.g. a backbone inside a multi-head model) and `TorchModel.feature`'s
    key prefix is dropped; a name sown twice is an error (ambiguous)."""
    out: dict[str, jax.Array] = {}

    def walk(node: Mapping[str, Any]) -> None:
        for k, v in node.items():
            if isinstance(v, tuple):
                k = k.removeprefix(FEATURE_PREFIX)
                if k in out:
                    raise ValueError(f"feature {k!r} is sown by more than one module; features must have unique names")
                out[k] = v[0]
            else:
                walk(v)

    walk(tree)
    return out


class TorchModel(nn.Module):
    """Base of every jtkd classifier.

    Fields shared by all architectures:
      num_classes: logits size; 0 drops the classifier and returns the pooled features.
      dtype: compute dtype (bf16 for mixed precision); parameters and BatchNorm stay float32.
      axis_name: mesh axis over which BatchNorm statistics are synchronised in training.
    Named intermediate outputs are sown into the 'features' collection (see `jtkd.models.features`).
    """

    num_classes: int = 1000
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    def norm(self, **kw: Any) -> BatchNorm:
        return BatchNorm(axis_name=self.axis_name, dtype=self.dtype, **kw)

    def conv(self, *args: Any, **kw: Any) -> nn.Conv:
        return Conv2d(*args, dtype=self.dtype, **kw)

    def linear(self, *args: Any, **kw: Any) -> nn.Dense:
        return Linear(*args, dtype=self.dtype, **kw)

    def feature(self, name: str, x: jax.Array) -> jax.Array:
        # prefixed: the torch path a feature is named after is often also a submodule's (Flax) name
        self.sow("features", FEATURE_PREFIX + name, x)
        return x

    def logits(self, x: jax.Array) -> jax.Array:
        """Logits leave the model in float32 whatever the compute dtype."""
        return x.astype(jnp.float32)
