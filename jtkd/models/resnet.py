"""ResNet, ResNeXt and Wide ResNet, as `torchvision.models.resnet` (v1.5: stride on the 3x3 conv)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jtkd.models import layers
from jtkd.models.registry import register


class BasicBlock(layers.TorchModel):
    planes: int = 64
    stride: int = 1
    downsample: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out = self.conv(self.planes, 3, self.stride, 1, bias=False, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out, train))
        out = self.conv(self.planes, 3, 1, 1, bias=False, name="conv2")(out)
        out = self.norm(name="bn2")(out, train)
        return nn.relu(out + _shortcut(self, x, self.planes, train))


class Bottleneck(layers.TorchModel):
    planes: int = 64
    stride: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = int(self.planes * (self.base_width / 64.0)) * self.groups
        out = self.conv(width, 1, bias=False, name="conv1")(x)
        out = nn.relu(self.norm(name="bn1")(out, train))
        out = self.conv(width, 3, self.stride, 1, groups=self.groups, bias=False, name="conv2")(out)
        out = nn.relu(self.norm(name="bn2")(out, train))
        out = self.conv(self.planes * 4, 1, bias=False, name="conv3")(out)
        out = self.norm(name="bn3")(out, train)
        return nn.relu(out + _shortcut(self, x, self.planes * 4, train))


def _shortcut(block: BasicBlock | Bottleneck, x: jax.Array, features: int, train: bool) -> jax.Array:
    if not block.downsample:
        return x
    x = block.conv(features, 1, block.stride, bias=False, name="downsample_0")(x)
    return block.norm(name="downsample_1")(x, train)


class ResNet(layers.TorchModel):
    block: str = "basic"  # "basic" | "bottleneck"
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    groups: int = 1
    width_per_group: int = 64
    width: int = 64  # channels of the stem and of layer1 (x2 per stage); not 64 = a narrow/wide variant, no torchvision weights

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        x = self.conv(self.width, 7, 2, 3, bias=False, name="conv1")(x)
        x = nn.relu(self.norm(name="bn1")(x, train))
        x = layers.max_pool(x, 3, 2, 1)
        block_cls, expansion = (BasicBlock, 1) if self.block == "basic" else (Bottleneck, 4)
        extra = {} if self.block == "basic" else {"groups": self.groups, "base_width": self.width_per_group}
        in_planes = self.width
        for i, n_blocks in enumerate(self.stage_sizes):
            planes = self.width * 2**i
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                down = j == 0 and (stride != 1 or in_planes != planes * expansion)
                x = block_cls(
                    planes=planes, stride=stride, downsample=down, dtype=self.dtype, axis_name=self.axis_name,
                    name=f"layer{i + 1}_{j}", **extra,
                )(x, train)
                in_planes = planes * expansion
            self.feature(f"layer{i + 1}", x)
        x = self.feature("pooled", layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1))
        if self.num_classes:
            x = self.linear(self.num_classes, name="fc")(x)
        return self.logits(x)


_CONFIGS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ("bottleneck", (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 1, 128),
}

for _name, (_block, _sizes, _groups, _width) in _CONFIGS.items():
    register(
        _name,
        ResNet,
        head="fc",
        kwargs=dict(block=_block, stage_sizes=_sizes, groups=_groups, width_per_group=_width),
    )
