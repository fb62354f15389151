"""AlexNet, as `torchvision.models.alexnet` (the "one weird trick" variant: 64/192/384/256/256)."""

from __future__ import annotations

import flax.linen as nn
import jax

from jtkd.models import layers
from jtkd.models.registry import register
from jtkd.models.vgg import conv_stack, torch_default_init

# torch's features: conv, ReLU, pool at indices 0-2, 3-5, then 6/8/10 conv, 12 pool
_FEATURES = (
    ("conv", 64, 11, 4, 2), ("pool", 3, 2),
    ("conv", 192, 5, 1, 2), ("pool", 3, 2),
    ("conv", 384, 3, 1, 1), ("conv", 256, 3, 1, 1), ("conv", 256, 3, 1, 1), ("pool", 3, 2),
)


class AlexNet(layers.TorchModel):
    """AlexNet. torchvision applies no custom init, so every layer uses torch's default.

    num_classes=0 drops the head (`classifier.6`) and returns the 4096-d output of `classifier.4`."""

    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        x = self.feature("features", conv_stack(self, x, _FEATURES, train, conv_init=torch_default_init))
        x = layers.torch_flatten(layers.adaptive_avg_pool(x, 6))
        for i in (1, 4):  # Dropout, Linear, ReLU
            x = layers.dropout(self, x, self.dropout, train)
            x = nn.relu(self.linear(4096, kernel_init=torch_default_init, name=f"classifier_{i}")(x))
        x = self.feature("pooled", x)
        if self.num_classes:
            x = self.linear(self.num_classes, kernel_init=torch_default_init, name="classifier_6")(x)
        return self.logits(x)


register("alexnet", AlexNet, head="classifier.6", min_size=63)
