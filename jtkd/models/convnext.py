"""ConvNeXt, as `torchvision.models.convnext`.

NHWC makes torchvision's `LayerNorm2d` (a LayerNorm over channels of an NCHW map) a plain LayerNorm
over the last axis (eps 1e-6 everywhere). A block is `block.0` depthwise 7x7 conv, `block.2` LayerNorm,
`block.3`/`block.5` Linear with an exact GELU between (`block.1`/`block.6` are parameterless Permutes);
its `layer_scale` keeps torch's (C, 1, 1) shape. Stochastic depth grows linearly over all blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtkd.models import layers
from jtkd.models.registry import register

_trunc02 = nn.initializers.truncated_normal(0.02)  # torchvision: trunc_normal_(std=0.02), zero bias


class CNBlock(layers.TorchModel):
    dim: int = 96
    layer_scale: float = 1e-6
    stochastic_depth_prob: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = self.dim
        y = self.conv(c, 7, 1, 3, groups=c, kernel_init=_trunc02, name="block_0")(x)
        y = layers.LayerNorm(1e-6, self.dtype, name="block_2")(y)
        y = layers.gelu(self.linear(4 * c, kernel_init=_trunc02, name="block_3")(y))
        y = self.linear(c, kernel_init=_trunc02, name="block_5")(y)
        gamma = self.param("layer_scale", lambda _, s: jnp.full(s, self.layer_scale, jnp.float32), (c, 1, 1))
        y = y * gamma.reshape(c).astype(self.dtype)
        return x + layers.stochastic_depth(self, y, self.stochastic_depth_prob, train)


class ConvNeXt(layers.TorchModel):
    # (input_channels, out_channels or None, num_layers) per stage, as torchvision's CNBlockConfig
    block_setting: Sequence[tuple[int, int | None, int]] = ((96, 192, 3), (192, 384, 3), (384, 768, 9), (768, None, 3))
    stochastic_depth_prob: float = 0.0
    layer_scale: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        ln = lambda name: layers.LayerNorm(1e-6, self.dtype, name=name)  # noqa: E731
        x = self.conv(self.block_setting[0][0], 4, 4, 0, kernel_init=_trunc02, name="features_0_0")(x)
        x = self.feature("features.0", ln("features_0_1")(x))
        total = sum(n for _, _, n in self.block_setting)
        block_id, idx = 0, 1
        for cin, cout, n in self.block_setting:
            for j in range(n):
                sd_prob = self.stochastic_depth_prob * block_id / (total - 1.0)
                x = CNBlock(
                    dim=cin, layer_scale=self.layer_scale, stochastic_depth_prob=sd_prob, dtype=self.dtype,
                    axis_name=self.axis_name, name=f"features_{idx}_{j}",
                )(x, train)
                block_id += 1
            x = self.feature(f"features.{idx}", x)
            idx += 1
            if cout is not None:
                x = ln(f"features_{idx}_0")(x)
                x = self.conv(cout, 2, 2, 0, kernel_init=_trunc02, name=f"features_{idx}_1")(x)
                idx += 1
        x = layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1)
        x = self.feature("pooled", ln("classifier_0")(x))  # classifier.0 is the norm, before the Linear
        if self.num_classes:
            x = self.linear(self.num_classes, kernel_init=_trunc02, name="classifier_2")(x)
        return self.logits(x)


_CONFIGS = {
    "convnext_tiny": (((96, 192, 3), (192, 384, 3), (384, 768, 9), (768, None, 3)), 0.1),
    "convnext_small": (((96, 192, 3), (192, 384, 3), (384, 768, 27), (768, None, 3)), 0.4),
    "convnext_base": (((128, 256, 3), (256, 512, 3), (512, 1024, 27), (1024, None, 3)), 0.5),
    "convnext_large": (((192, 384, 3), (384, 768, 3), (768, 1536, 27), (1536, None, 3)), 0.5),
}

for _name, (_setting, _sd) in _CONFIGS.items():
    register(
        _name, ConvNeXt, head="classifier.2", kwargs=dict(block_setting=_setting, stochastic_depth_prob=_sd), min_size=32
    )
