"""oneDNN convolutions and batched matmuls on XLA:CPU, as XLA FFI custom calls (`jtkd/csrc/onednn.cc`).

jaxlib's XLA:CPU ships no oneDNN convolution. This module compiles a small FFI library against
the oneDNN of the `onednn-cpu-gomp` wheel (headers from `onednn-devel-cpu-gomp`) with the system
C++ compiler on first use, caches the shared object under `~/.cache/jtkd` (keyed by a hash of the
source, jaxlib and oneDNN), and registers its handlers: convolution forward, input gradient and
weight gradient on NHWC activations and HWIO kernels, and a batched matmul whose operands may be
transposed, all read in place. Where MKL is installed too (the `mkl` and `mkl-include` wheels), the
library also holds the same matmul by MKL's sgemm (`matmul(..., library="mkl")`, `mkl_available()`)
and a fused self-attention on it (`attention`).

`conv` is differentiable (custom VJP); which gradient runs where is chosen by the caller, because
oneDNN's weight gradient on NHWC is the slow one for kernels larger than 1x1 on AVX2 machines
(bench/FINDINGS.md). If the compiler or oneDNN is missing, `available()` is False and `reason()`
says why; `jtkd.models.layers.conv` then warns once and keeps its matmul formulations.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "onednn.cc"
_CONV_PASSES = {"fwd": "JtkdOnednnConvForward", "bwd_data": "JtkdOnednnConvBackwardData",
                "bwd_weights": "JtkdOnednnConvBackwardWeights"}
_TARGETS = {**{f"conv_{k}": v for k, v in _CONV_PASSES.items()}, "matmul": "JtkdOnednnMatmul"}
# in the library only where it was built with MKL
_MKL_TARGETS = {"mkl_matmul": "JtkdMklMatmul", "mkl_attention": "JtkdMklAttention",
                "mkl_attention_fwd": "JtkdMklAttentionForward", "mkl_attention_bwd": "JtkdMklAttentionBackward"}
_MATMUL_TARGETS = {"onednn": "matmul", "mkl": "mkl_matmul"}  # `matmul`'s libraries and their FFI targets
# MKL's threading layer for libgomp, the OpenMP runtime oneDNN's gomp build runs on too
_MKL_LIBS = ("mkl_intel_lp64", "mkl_gnu_thread", "mkl_core")


class OneDNNUnavailable(RuntimeError):
    """The oneDNN extension cannot be built or loaded here; the message says why."""


def _onednn_root() -> Path:
    """Where oneDNN's `include/` and `lib/` are: `JTKD_ONEDNN_ROOT`, else the Python environment's
    data prefix (where the onednn wheels install them)."""
    root = os.environ.get("JTKD_ONEDNN_ROOT")
    return Path(root) if root else Path(sysconfig.get_paths()["data"])


def _mkl_flags() -> list[str]:
    """Compiler flags that add MKL's sgemm to the extension, from `JTKD_MKL_ROOT` or the environment's data
    prefix (where the mkl wheels install it); [] when its header or libraries are not there."""
    root = Path(os.environ.get("JTKD_MKL_ROOT") or sysconfig.get_paths()["data"])
    header, libs = root / "include" / "mkl_cblas.h", []
    for name in _MKL_LIBS:  # the wheels ship only versioned names (libmkl_core.so.3)
        found = sorted((root / "lib").glob(f"lib{name}.so*"), key=lambda f: len(f.name))
        libs.append(found[0] if found else None)
    if not header.is_file() or None in libs:
        return []
    # -fopenmp: the fused attention splits its heads over OpenMP threads (GNU's, as MKL's threading layer)
    return ["-DJTKD_WITH_MKL", "-fopenmp", f"-I{root / 'include'}", f"-L{root / 'lib'}",
            *(f"-l:{f.name}" for f in libs), "-lgomp", f"-Wl,-rpath,{root / 'lib'}"]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jtkd"


def _build() -> Path:
    """Compile the extension (once per source/jaxlib/oneDNN combination) and return its path."""
    root = _onednn_root()
    header, lib = root / "include" / "oneapi" / "dnnl" / "dnnl.hpp", root / "lib" / "libdnnl.so.3"
    if not header.is_file() or not lib.is_file():
        raise OneDNNUnavailable(f"oneDNN not found under {root} (need {header} and {lib}); "
                                "pip install onednn-cpu-gomp onednn-devel-cpu-gomp, or set JTKD_ONEDNN_ROOT")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise OneDNNUnavailable(f"no C++ compiler ({cxx!r} not on PATH; set CXX)")
    import jaxlib

    mkl = _mkl_flags()
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), jaxlib.__version__.encode(), str(lib.resolve()).encode(),
                                     sys.version.encode(), " ".join(mkl).encode()])).hexdigest()[:16]
    out = _cache_dir() / f"onednn-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent processes (pytest-xdist) never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}", f"-I{root / 'include'}",
           str(SOURCE), "-o", tmp, f"-L{lib.parent}", "-l:libdnnl.so.3", f"-Wl,-rpath,{lib.parent}", *mkl]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise OneDNNUnavailable(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


@functools.cache
def _library() -> ctypes.CDLL | OneDNNUnavailable:
    try:
        lib = ctypes.CDLL(str(_build()))
    except OneDNNUnavailable as err:
        return err
    except OSError as err:  # a broken cached build or a oneDNN that fails to load
        return OneDNNUnavailable(f"loading the oneDNN extension failed: {err}")
    for name, symbol in {**_TARGETS, **{k: v for k, v in _MKL_TARGETS.items() if hasattr(lib, v)}}.items():
        jax.ffi.register_ffi_target(f"jtkd_onednn_{name}", jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    p = ctypes.POINTER(ctypes.c_int64)
    lib.JtkdOnednnImplInfo.argtypes = [ctypes.c_int, p, p, p, p, ctypes.c_int64, ctypes.c_char_p, ctypes.c_int64]
    lib.JtkdOnednnImplInfo.restype = ctypes.c_int64
    i64 = ctypes.c_int64
    lib.JtkdOnednnMatmulImplInfo.argtypes = [i64, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, i64]
    lib.JtkdOnednnMatmulImplInfo.restype = i64
    lib.dnnl_get_effective_cpu_isa.restype = ctypes.c_int  # oneDNN's own, reached through the extension
    return lib


@functools.cache
def avx512() -> bool:
    """Whether oneDNN runs AVX-512 kernels on this CPU (its effective ISA, which ONEDNN_MAX_CPU_ISA caps)."""
    lib = _require()
    avx512_core = 0x27  # dnnl_cpu_isa_avx512_core: a bit mask every AVX-512 ISA of oneDNN's contains
    return lib.dnnl_get_effective_cpu_isa() & avx512_core == avx512_core


def enabled() -> bool:
    """Whether `layers.conv` should use oneDNN: available and not turned off with `JTKD_ONEDNN=0`.
    Warns once (with the reason) when it is wanted but cannot be built or loaded."""
    if os.environ.get("JTKD_ONEDNN", "1") == "0":
        return False
    if not available():
        _warn_unavailable()
        return False
    return True


@functools.cache
def _warn_unavailable() -> None:
    warnings.warn(f"jtkd: oneDNN convolutions unavailable, using XLA's ({reason()}); "
                  "set JTKD_ONEDNN=0 to silence this", RuntimeWarning, stacklevel=3)


def available() -> bool:
    """Whether the oneDNN extension is built and registered (builds it on the first call)."""
    return not isinstance(_library(), OneDNNUnavailable)


def reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    lib = _library()
    return str(lib) if isinstance(lib, OneDNNUnavailable) else ""


def mkl_available() -> bool:
    """Whether the extension holds MKL's sgemm and the fused attention (built where MKL's header and libraries
    were found)."""
    return available() and all(hasattr(_library(), symbol) for symbol in _MKL_TARGETS.values())


def _require() -> ctypes.CDLL:
    lib = _library()
    if isinstance(lib, OneDNNUnavailable):
        raise lib
    return lib


Geometry = tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]], tuple[int, int], int]


def _attrs(geometry: Geometry) -> dict:
    strides, padding, dilation, groups = geometry
    i64 = functools.partial(np.asarray, dtype=np.int64)
    return dict(strides=i64(strides), pad_lo=i64([p[0] for p in padding]), pad_hi=i64([p[1] for p in padding]),
                dilation=i64(dilation), groups=np.int64(groups))


def conv_out_size(n: int, k: int, s: int, pad: Sequence[int], d: int) -> int:
    """Output length of a convolution over `n` with kernel `k`, stride `s`, padding (lo, hi), dilation `d`."""
    return (n + pad[0] + pad[1] - d * (k - 1) - 1) // s + 1


def _out_shape(x_shape: Sequence[int], w_shape: Sequence[int], geometry: Geometry) -> tuple[int, ...]:
    strides, padding, dilation, _ = geometry
    n, h, w, _ = x_shape
    kh, kw, _, o = w_shape
    return (n, conv_out_size(h, kh, strides[0], padding[0], dilation[0]),
            conv_out_size(w, kw, strides[1], padding[1], dilation[1]), o)


def _call(target: str, shape: Sequence[int] | list[Sequence[int]], *operands: jax.Array, **attrs: Any) -> Any:
    """One FFI call with a float32 result of `shape`, or a list of results for a list of shapes; under
    shard_map its results vary over the axes its operands vary over."""
    _require()
    shapes = shape if isinstance(shape, list) else [shape]
    outs = jax.ffi.ffi_call(f"jtkd_onednn_{target}", [jax.ShapeDtypeStruct(tuple(s), jnp.float32) for s in shapes],
                            vmap_method="sequential")(*operands, **attrs)
    axes = tuple(sorted(_varying(*operands)))  # ffi_call results carry no shard_map type of their own
    outs = [jax.lax.pcast(o, axes, to="varying") if axes else o for o in outs]
    return outs if isinstance(shape, list) else outs[0]


def _varying(*arrays: jax.Array) -> frozenset:
    return frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))


def match_varying(*arrays: jax.Array) -> list[jax.Array]:
    """Mark every operand as varying over the union of their shard_map axes (an FFI call, or a custom
    VJP mixing activations and parameters, has one type for all its operands). The transpose of that
    cast sums a replicated kernel's gradient over the axes, as it does for XLA's own convolution."""
    axes = _varying(*arrays)
    return [jax.lax.pcast(a, tuple(sorted(axes - _varying(a))), to="varying") if axes - _varying(a) else a
            for a in arrays]


def conv(x: jax.Array, w: jax.Array, geometry: Geometry, xla_weight_grad: bool = False) -> jax.Array:
    """NHWC x HWIO float32 convolution by oneDNN; geometry = (strides, ((lo, hi), (lo, hi)), dilation,
    groups). With `xla_weight_grad` the weight gradient is XLA's convolution, not oneDNN's: on AVX2
    oneDNN's NHWC weight gradient is 1.5-2.5x slower than XLA's for 3x3 kernels, 2-3x faster for 1x1."""
    return _conv(*match_varying(x, w), geometry, xla_weight_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, w: jax.Array, geometry: Geometry, xla_weight_grad: bool) -> jax.Array:
    return _call("conv_fwd", _out_shape(x.shape, w.shape, geometry), x, w, **_attrs(geometry))


def _conv_fwd(x, w, geometry, xla_weight_grad):
    return _conv(x, w, geometry, xla_weight_grad), (x, w)


def _conv_bwd(geometry, xla_weight_grad, res, dy):
    x, w = res
    dx = _call("conv_bwd_data", x.shape, dy, w, **_attrs(geometry))
    if xla_weight_grad:
        strides, padding, dilation, groups = geometry
        _, vjp = jax.vjp(lambda w: jax.lax.conv_general_dilated(
            x, w, strides, padding, rhs_dilation=dilation, feature_group_count=groups,
            dimension_numbers=("NHWC", "HWIO", "NHWC")), w)
        (dw,) = vjp(dy)
    else:
        dw = _call("conv_bwd_weights", w.shape, x, dy, **_attrs(geometry))
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False,
           library: str = "onednn") -> jax.Array:
    """Batched float32 matmul, op(a) @ op(b) for a: (batch, m, k) and b: (batch, k, n), or both
    unbatched (m, k) and (k, n), where op transposes the last two axes when asked; transposed operands
    are read in place. By oneDNN, or with `library="mkl"` by MKL's sgemm (see `mkl_available`); the
    gradients' matmuls run on the same library."""
    if library not in _MATMUL_TARGETS:
        raise ValueError(f"matmul: library must be one of {sorted(_MATMUL_TARGETS)}, got {library!r}")
    if library == "mkl" and not mkl_available():
        raise OneDNNUnavailable("matmul(library='mkl'): the extension was built without MKL (pip install mkl "
                                "mkl-include, or set JTKD_MKL_ROOT)")
    return _matmul(*match_varying(a, b), transpose_a, transpose_b, library)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool, library: str) -> jax.Array:
    m = a.shape[-1] if transpose_a else a.shape[-2]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    return _call(_MATMUL_TARGETS[library], (*a.shape[:-2], m, n), a, b, transpose_a=transpose_a,
                 transpose_b=transpose_b)


def _matmul_fwd(a, b, transpose_a, transpose_b, library):
    return _matmul(a, b, transpose_a, transpose_b, library), (a, b)


def matmul_grads(a: jax.Array, b: jax.Array, dc: jax.Array, transpose_a: bool = False,
                 transpose_b: bool = False, xla_b_grad: bool = False,
                 library: str = "onednn") -> tuple[jax.Array, jax.Array]:
    """The gradients (da, db) of c = op(a) @ op(b) for the cotangent dc, by matmuls of `library` reading
    the transposed operands in place; operands of one shard_map type (`match_varying`). With
    `xla_b_grad` db is XLA's dot instead (as `conv`'s `xla_weight_grad`)."""
    def mm(x: jax.Array, y: jax.Array, tx: bool, ty: bool) -> jax.Array:
        return _matmul(x, y, tx, ty, library)

    # d op(a) = dc op(b)^T and d op(b) = op(a)^T dc, each stored back as a / b are.
    da = mm(b, dc, transpose_b, True) if transpose_a else mm(dc, b, False, not transpose_b)
    if xla_b_grad:
        op_a = jnp.swapaxes(a, -1, -2) if transpose_a else a
        db = jnp.swapaxes(dc, -1, -2) @ op_a if transpose_b else jnp.swapaxes(op_a, -1, -2) @ dc
    else:
        db = mm(dc, a, True, transpose_a) if transpose_b else mm(a, dc, not transpose_a, False)
    return da, db


def _matmul_bwd(transpose_a, transpose_b, library, res, dc):
    return matmul_grads(*res, dc, transpose_a, transpose_b, library=library)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def check_attention(qkv: jax.Array, num_heads: int, bias: jax.Array | None = None) -> None:
    """Raise ValueError naming the problem unless qkv is (batch, tokens, 3 * num_heads * head_dim) and bias,
    if given, (groups, num_heads, tokens, tokens) with groups dividing batch."""
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"attention: qkv must be (batch, tokens, 3 * {num_heads} heads * head_dim), got {qkv.shape}")
    b, n, _ = qkv.shape
    if bias is not None and (bias.ndim != 4 or bias.shape[1:] != (num_heads, n, n) or not bias.shape[0]
                             or b % bias.shape[0]):
        raise ValueError(f"attention: bias must be (groups, {num_heads}, {n}, {n}) with groups dividing the batch "
                         f"{b}, got {bias.shape}")


def attention(qkv: jax.Array, num_heads: int, bias: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Self-attention by MKL (see `mkl_available`), softmax(scale q k^T + bias) v for every head, from a packed
    float32 qkv of shape (batch, tokens, 3 * num_heads * head_dim), laid out as torch's in_proj writes it
    (q | k | v, each heads x head_dim); returns (batch, tokens, num_heads * head_dim), the heads side by side
    as torch joins them. `scale` defaults to 1 / sqrt(head_dim). `bias`, (groups, num_heads, tokens, tokens),
    is added to the scores of batch element i as bias[i % groups] (Swin's windows: masks and relative
    position biases) and gets its gradient.

    One kernel per (batch, head) keeps the scores in cache and reads q, k, v in place; the gradient is one
    call too, from the softmax saved by the forward pass (a forward pass alone keeps no softmax)."""
    check_attention(qkv, num_heads, bias)
    if qkv.dtype != jnp.float32:
        raise ValueError(f"attention: the MKL kernel takes float32 qkv, got {qkv.dtype}")
    if not mkl_available():
        raise OneDNNUnavailable("attention: the extension was built without MKL (pip install mkl mkl-include, "
                                "or set JTKD_MKL_ROOT)")
    b, n, width = qkv.shape
    if bias is None:  # zero groups: the kernel adds nothing
        bias = jnp.zeros((0, num_heads, n, n), jnp.float32)
    if scale is None:
        scale = 1.0 / math.sqrt(width // (3 * num_heads))
    return _attention(*match_varying(qkv, bias.astype(jnp.float32)), num_heads, float(scale))


def _attention_attrs(num_heads: int, scale: float) -> dict:
    return dict(heads=np.int64(num_heads), scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _attention(qkv: jax.Array, bias: jax.Array, num_heads: int, scale: float) -> jax.Array:
    b, n, width = qkv.shape
    return _call("mkl_attention", (b, n, width // 3), qkv, bias, **_attention_attrs(num_heads, scale))


def _attention_fwd(qkv, bias, num_heads, scale):
    b, n, width = qkv.shape
    out, probs = _call("mkl_attention_fwd", [(b, n, width // 3), (b, num_heads, n, n)], qkv, bias,
                       **_attention_attrs(num_heads, scale))
    return out, (qkv, bias, probs)


def _attention_bwd(num_heads, scale, res, dout):
    qkv, bias, probs = res
    scratch = (qkv.shape[0] if bias.shape[0] else 0, *bias.shape[1:])  # the kernel's, for the bias gradient
    dqkv, dbias, _ = _call("mkl_attention_bwd", [qkv.shape, bias.shape, scratch],
                           *match_varying(qkv, bias, probs, dout), **_attention_attrs(num_heads, scale))
    return dqkv, dbias


_attention.defvjp(_attention_fwd, _attention_bwd)


def implementation(kind: str, x_shape: Sequence[int], w_shape: Sequence[int], geometry: Geometry) -> str:
    """oneDNN's implementation name for one pass ('fwd', 'bwd_data', 'bwd_weights'), e.g. 'brgconv:avx2'.
    A name starting with 'ref' is oneDNN's slow reference loop."""
    lib = _require()
    strides, padding, dilation, groups = geometry
    arr = lambda v: (ctypes.c_int64 * len(v))(*[int(i) for i in v])  # noqa: E731
    attrs = [*strides, *(p[0] for p in padding), *(p[1] for p in padding), *dilation]
    buf = ctypes.create_string_buffer(256)
    lib.JtkdOnednnImplInfo(list(_CONV_PASSES).index(kind), arr(x_shape), arr(w_shape),
                           arr(_out_shape(x_shape, w_shape, geometry)), arr(attrs), groups, buf, len(buf))
    return buf.value.decode()


def matmul_implementation(a_shape: Sequence[int], b_shape: Sequence[int], transpose_a: bool = False,
                          transpose_b: bool = False) -> str:
    """oneDNN's implementation name for `matmul` on these (batch, rows, cols) operands, e.g. 'gemm:jit:f32'."""
    lib = _require()
    buf = ctypes.create_string_buffer(256)
    lib.JtkdOnednnMatmulImplInfo(*(int(v) for v in (*a_shape, *b_shape[1:])), int(transpose_a), int(transpose_b),
                                 buf, len(buf))
    return buf.value.decode()
