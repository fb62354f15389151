"""Ports of the `torchvision.ops.misc` blocks and `torchvision.models._utils` helpers that several
families share (EfficientNet, RegNet): Conv2dNormActivation, SqueezeExcitation, _make_divisible.

Private module (leading underscore): `jtkd.models` does not import it as a family.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtkd.models import layers


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """`torchvision.models._utils._make_divisible`: round to a multiple of `divisor`, never more than 10% down."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_norm_act(
    mod: layers.TorchModel,
    x: jax.Array,
    prefix: str,
    features: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    activation: Callable[[jax.Array], jax.Array] | None = None,
    train: bool = False,
    **norm_kw: float,
) -> jax.Array:
    """`torchvision.ops.Conv2dNormActivation` (conv without bias, BatchNorm, optional activation).

    Called inside `mod`'s compact method, so the torch Sequential's children become submodules
    `<prefix>_0` (conv) and `<prefix>_1` (norm) of `mod`, which is what the key map expects.
    `norm_kw` are the BatchNorm's torch-convention `epsilon` / `momentum`.
    """
    pad = (kernel_size - 1) // 2
    x = mod.conv(features, kernel_size, stride, pad, groups=groups, bias=False, name=f"{prefix}_0")(x)
    x = mod.norm(name=f"{prefix}_1", **norm_kw)(x, train)
    return activation(x) if activation is not None else x


class SqueezeExcitation(nn.Module):
    """`torchvision.ops.SqueezeExcitation`: global average, 1x1 conv `fc1`, activation, 1x1 conv `fc2`,
    scale activation, then rescale the input channels."""

    squeeze_channels: int
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    scale_activation: Callable[[jax.Array], jax.Array] = nn.sigmoid
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = x.mean(axis=(1, 2), keepdims=True)
        s = layers.Conv2d(self.squeeze_channels, 1, dtype=self.dtype, name="fc1")(s)
        s = self.activation(s)
        s = layers.Conv2d(x.shape[-1], 1, dtype=self.dtype, name="fc2")(s)
        return self.scale_activation(s) * x
