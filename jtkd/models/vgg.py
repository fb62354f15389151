"""VGG 11/13/16/19, with and without BatchNorm, as `torchvision.models.vgg`.

torch's `features` is one nn.Sequential, so its layers are the Flax modules `features_<i>` of the
top-level model (conv at i, BatchNorm at i+1). The classifier sees an NCHW flatten of a 7x7 adaptive
average pool, which at small inputs (e.g. 97x131 -> a 3x4 map) replicates cells exactly as torch's
overlapping adaptive bins do.

With num_classes=0 the last Linear (`classifier.6`, the head) is dropped and the 4096-d output of
`classifier.3` (after its ReLU, before the head's Dropout) is returned, so every non-head checkpoint key still has a home.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

from jtkd.models import layers
from jtkd.models.registry import register

# "M" is a 2x2/2 max pool, an int a 3x3 conv (+ BatchNorm) + ReLU with that many channels
_CFGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}

torch_default_init = layers.torch_linear_init  # kaiming_uniform(a=sqrt(5)): torch's Conv2d/Linear default


def conv_stack(
    mod: layers.TorchModel,
    x: jax.Array,
    cfg: Sequence[tuple],
    train: bool,
    *,
    batch_norm: bool = False,
    conv_init: Callable = layers.kaiming_fan_out,
) -> jax.Array:
    """A torch nn.Sequential `features` of conv(+BN)+ReLU and max pools, created as `features_<i>`
    children of `mod`. cfg items: ("conv", out, kernel, stride, padding) or ("pool", kernel, stride).
    Every pool output is sown as a feature under its torch index."""
    i = 0
    for item in cfg:
        if item[0] == "pool":
            x = layers.max_pool(x, item[1], item[2])
            mod.feature(f"features.{i}", x)
            i += 1
            continue
        _, out, k, s, p = item
        x = mod.conv(out, k, s, p, kernel_init=conv_init, name=f"features_{i}")(x)
        i += 1
        if batch_norm:
            x = mod.norm(name=f"features_{i}")(x, train)
            i += 1
        x = nn.relu(x)
        i += 1  # the ReLU
    return x


class VGG(layers.TorchModel):
    """VGG; `cfg` is a key of `_CFGS`. `init_weights` picks torchvision's init (True) or torch's default."""

    cfg: str = "A"
    batch_norm: bool = False
    dropout: float = 0.5
    init_weights: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        conv_init = layers.kaiming_fan_out if self.init_weights else torch_default_init
        lin_init = nn.initializers.normal(0.01) if self.init_weights else torch_default_init
        cfg = [("pool", 2, 2) if v == "M" else ("conv", v, 3, 1, 1) for v in _CFGS[self.cfg]]
        x = self.feature("features", conv_stack(self, x, cfg, train, batch_norm=self.batch_norm, conv_init=conv_init))
        x = layers.torch_flatten(layers.adaptive_avg_pool(x, 7))
        x = nn.relu(self.linear(4096, kernel_init=lin_init, name="classifier_0")(x))
        x = layers.dropout(self, x, self.dropout, train)
        x = self.feature("pooled", nn.relu(self.linear(4096, kernel_init=lin_init, name="classifier_3")(x)))
        if self.num_classes:  # the dropout right before the head belongs to it
            x = layers.dropout(self, x, self.dropout, train)
            x = self.linear(self.num_classes, kernel_init=lin_init, name="classifier_6")(x)
        return self.logits(x)


for _cfg, _depth in (("A", 11), ("B", 13), ("D", 16), ("E", 19)):
    for _bn in (False, True):
        register(
            f"vgg{_depth}{'_bn' if _bn else ''}",
            VGG,
            head="classifier.6",
            kwargs=dict(cfg=_cfg, batch_norm=_bn),
            min_size=32,
        )
