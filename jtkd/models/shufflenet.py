"""ShuffleNet V2 (x0.5, x1.0, x1.5, x2.0), as `torchvision.models.shufflenetv2`.

All BatchNorms are torch defaults (eps 1e-5, momentum 0.1). The channel order after each block's
concatenation and shuffle is torch's NCHW order, so the converted weights line up channel for channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtkd.models import layers
from jtkd.models.registry import register


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """torchvision's channel_shuffle on NHWC: torch views channels as (groups, C/groups) and transposes
    them to (C/groups, groups); the channel axis here is last, so do the same on the last two axes."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, w, groups, c // groups)
    return jnp.swapaxes(x, 3, 4).reshape(n, h, w, c)


class InvertedResidual(layers.TorchModel):
    """The ShuffleNetV2 unit. stride 1: split channels, transform the second half (`branch2`);
    stride > 1: both `branch1` (depthwise downsampling) and `branch2` see the whole input. Then shuffle."""

    inp: int = 24
    oup: int = 116
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bf = self.oup // 2
        if self.stride == 1:
            if self.inp != bf * 2:
                raise ValueError(f"stride 1 needs inp == oup (got inp {self.inp}, oup {self.oup})")
            x1, x2 = jnp.split(x, 2, axis=-1)  # torch x.chunk(2, dim=1)
        else:
            x1 = self.conv(self.inp, 3, self.stride, 1, groups=self.inp, bias=False, name="branch1_0")(x)
            x1 = self.norm(name="branch1_1")(x1, train)
            x1 = self.conv(bf, 1, bias=False, name="branch1_2")(x1)
            x1 = nn.relu(self.norm(name="branch1_3")(x1, train))
            x2 = x
        y = self.conv(bf, 1, bias=False, name="branch2_0")(x2)
        y = nn.relu(self.norm(name="branch2_1")(y, train))
        y = self.conv(bf, 3, self.stride, 1, groups=bf, bias=False, name="branch2_3")(y)
        y = self.norm(name="branch2_4")(y, train)
        y = self.conv(bf, 1, bias=False, name="branch2_5")(y)
        y = nn.relu(self.norm(name="branch2_6")(y, train))
        return channel_shuffle(jnp.concatenate([x1, y], axis=-1), 2)


class ShuffleNetV2(layers.TorchModel):
    """`torchvision.models.ShuffleNetV2`: conv1, max pool, stage2-4, conv5, global mean, fc."""

    stages_repeats: Sequence[int] = (4, 8, 4)
    stages_out_channels: Sequence[int] = (24, 116, 232, 464, 1024)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if len(self.stages_repeats) != 3 or len(self.stages_out_channels) != 5:
            raise ValueError("ShuffleNetV2 needs 3 stage repeats and 5 output widths")
        x = x.astype(self.dtype)
        c = self.stages_out_channels[0]
        x = self.conv(c, 3, 2, 1, bias=False, name="conv1_0")(x)
        x = nn.relu(self.norm(name="conv1_1")(x, train))
        x = self.feature("conv1", x)
        x = layers.max_pool(x, 3, 2, 1)
        inp = c
        for s, (repeats, oup) in enumerate(zip(self.stages_repeats, self.stages_out_channels[1:]), start=2):
            for j in range(repeats):
                x = InvertedResidual(
                    inp=inp if j == 0 else oup, oup=oup, stride=2 if j == 0 else 1,
                    dtype=self.dtype, axis_name=self.axis_name, name=f"stage{s}_{j}",
                )(x, train)
            self.feature(f"stage{s}", x)
            inp = oup
        x = self.conv(self.stages_out_channels[-1], 1, bias=False, name="conv5_0")(x)
        x = nn.relu(self.norm(name="conv5_1")(x, train))
        x = self.feature("conv5", x)
        x = self.feature("pooled", x.mean(axis=(1, 2)))  # torch x.mean([2, 3])
        if self.num_classes:
            x = self.linear(self.num_classes, name="fc")(x)
        return self.logits(x)


_CONFIGS = {
    "shufflenet_v2_x0_5": (24, 48, 96, 192, 1024),
    "shufflenet_v2_x1_0": (24, 116, 232, 464, 1024),
    "shufflenet_v2_x1_5": (24, 176, 352, 704, 1024),
    "shufflenet_v2_x2_0": (24, 244, 488, 976, 2048),
}

for _name, _widths in _CONFIGS.items():
    register(_name, ShuffleNetV2, head="fc", kwargs={"stages_repeats": (4, 8, 4), "stages_out_channels": _widths})
