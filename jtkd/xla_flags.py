"""XLA:CPU flags that jtkd's entry points (experiments, bench) set before JAX starts.

XLA reads `XLA_FLAGS` once, when the first backend initialises, so a flag cannot be chosen per
model or per call; the programs that own the process apply it. GPU/TPU backends ignore `xla_cpu_*`
flags. A flag the user already set in `XLA_FLAGS` is left as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import MutableMapping

CPU_FLAGS: dict[str, str] = {
    # XLA:CPU's default convolution library (YNNPACK) splits a convolution's work over blocks of output
    # channels, so a convolution with 64 output channels (ResNet stems and layer1, their input and weight
    # gradients) runs on one thread; XLA's Eigen convolution uses every core. ResNet-18 train step at
    # 224 px, batch 8, 2 cores: 0.79 -> 0.67 s wall (bench/FINDINGS.md). Dots keep YNNPACK.
    "--xla_cpu_experimental_ynn_fusion_type": "-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: one arena, no mmap'd blocks, no trimming of the heap.

    XLA:CPU allocates each execution's temporaries afresh, from a worker thread: resnet50's train step
    at 224 px, batch 8, takes one 1.08 GB block. glibc serves a block that large in a thread arena
    with mmap and unmaps it when freed, so every step faults the whole block in again (1.1 GB of page
    faults a step). From the main heap it is reused: 0.18 GB of faults a step, and the step is about
    10% faster (3.0 -> 2.75 s; torch eager in the same process gains about as much, bench/FINDINGS.md).
    The process keeps its peak memory until it exits. `JTKD_KEEP_FREED_MEMORY=0` leaves malloc alone.
    Returns whether the settings were applied (False off glibc). Run it before JAX starts its threads.
    """
    if os.environ.get("JTKD_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)])


def use_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Append `CPU_FLAGS` to XLA_FLAGS (keeping any the user set) and return the flags added; for the
    process's own environment, also `keep_freed_memory()`.

    Raises RuntimeError once a JAX backend exists: the flags would be silently ignored.
    """
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("jtkd.xla_flags.use_cpu_flags() must run before JAX initialises a backend "
                           "(before the first jax.devices(), jnp array or jit call)")
    current = environ.get("XLA_FLAGS", "")
    added = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    if environ is os.environ:
        keep_freed_memory()
    return added
