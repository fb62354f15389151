"""SqueezeNet 1.0 and 1.1, as `torchvision.models.squeezenet`.

Quirks kept: every max pool uses ceil_mode=True, and the classifier is a 1x1 conv (`classifier.1`,
the head) + ReLU + global average pool, so the logits are non-negative. num_classes=0 drops that
conv and returns the globally average-pooled 512-d features instead.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtkd.models import layers
from jtkd.models.registry import register

kaiming_uniform = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")  # torch kaiming_uniform_ (a=0)


class Fire(layers.TorchModel):
    squeeze_planes: int = 16
    expand1x1_planes: int = 64
    expand3x3_planes: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(self.conv(self.squeeze_planes, 1, kernel_init=kaiming_uniform, name="squeeze")(x))
        a = nn.relu(self.conv(self.expand1x1_planes, 1, kernel_init=kaiming_uniform, name="expand1x1")(x))
        b = nn.relu(self.conv(self.expand3x3_planes, 3, 1, 1, kernel_init=kaiming_uniform, name="expand3x3")(x))
        return jnp.concatenate([a, b], axis=-1)


# torch `features` per version: the stem conv (out, kernel), then "M" (3x3/2 ceil-mode max pool) or
# a Fire (squeeze, expand1x1, expand3x3); indices follow torch's Sequential (ReLU at 1, pool at 2)
_STEMS = {"1_0": (96, 7), "1_1": (64, 3)}
_BODIES: dict[str, tuple] = {
    "1_0": ("M", (16, 64, 64), (16, 64, 64), (32, 128, 128), "M", (32, 128, 128), (48, 192, 192),
            (48, 192, 192), (64, 256, 256), "M", (64, 256, 256)),
    "1_1": ("M", (16, 64, 64), (16, 64, 64), "M", (32, 128, 128), (32, 128, 128), "M", (48, 192, 192),
            (48, 192, 192), (64, 256, 256), (64, 256, 256)),
}


class SqueezeNet(layers.TorchModel):
    version: str = "1_0"
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.version not in _STEMS:
            raise ValueError(f"Unsupported SqueezeNet version {self.version}: 1_0 or 1_1 expected")
        x = x.astype(self.dtype)
        out, k = _STEMS[self.version]
        x = nn.relu(self.conv(out, k, 2, kernel_init=kaiming_uniform, name="features_0")(x))
        for i, item in enumerate(_BODIES[self.version], start=2):
            if item == "M":
                x = layers.max_pool(x, 3, 2, ceil_mode=True)
            else:
                sq, e1, e3 = item
                x = Fire(
                    squeeze_planes=sq, expand1x1_planes=e1, expand3x3_planes=e3, dtype=self.dtype,
                    axis_name=self.axis_name, name=f"features_{i}",
                )(x, train)
                self.feature(f"features.{i}", x)
        # "pooled" is what num_classes=0 returns; the head itself is a 1x1 conv on the spatial map (then
        # ReLU, then the pool), so with a head the pooled vector is sown but not fed forward
        pooled = self.feature("pooled", layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1))
        if not self.num_classes:
            return self.logits(pooled)
        x = layers.dropout(self, x, self.dropout, train)
        x = nn.relu(self.conv(self.num_classes, 1, kernel_init=nn.initializers.normal(0.01), name="classifier_1")(x))
        return self.logits(layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1))


register("squeezenet1_0", SqueezeNet, head="classifier.1", kwargs=dict(version="1_0"), min_size=21)
register("squeezenet1_1", SqueezeNet, head="classifier.1", kwargs=dict(version="1_1"), min_size=17)
