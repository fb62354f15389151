"""XLA:CPU flags that jtkd's entry points (experiments, bench) set before JAX starts.

XLA reads `XLA_FLAGS` once, when the first backend initialises, so a flag cannot be chosen per
model or per call; the programs that own the process apply it. GPU/TPU backends ignore `xla_cpu_*`
flags. A flag the user already set in `XLA_FLAGS` is left as it is.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

CPU_FLAGS: dict[str, str] = {
    # XLA:CPU's default convolution library (YNNPACK) splits a convolution's work over blocks of output
    # channels, so a convolution with 64 output channels (ResNet stems and layer1, their input and weight
    # gradients) runs on one thread; XLA's Eigen convolution uses every core. ResNet-18 train step at
    # 224 px, batch 8, 2 cores: 0.79 -> 0.67 s wall (bench/FINDINGS.md). Dots keep YNNPACK.
    "--xla_cpu_experimental_ynn_fusion_type": "-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}


def use_cpu_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Append `CPU_FLAGS` to XLA_FLAGS (keeping any the user set) and return the flags added.

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
    return added
