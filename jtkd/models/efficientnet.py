"""EfficientNet B0-B7 and EfficientNetV2 S/M/L, as `torchvision.models.efficientnet`.

One module serves both versions: the stage table (`_efficientnet_conf`, ported from torchvision's
function of the same name) says per stage whether blocks are MBConv (depthwise + squeeze-excitation)
or FusedMBConv (V2's first stages), and the builder fixes the BatchNorm eps/momentum, dropout and
last channel width exactly as torchvision's builders do:
  B0-B4: BatchNorm2d defaults (eps 1e-5, momentum 0.1); B5-B7: eps 1e-3, momentum 0.01;
  V2: eps 1e-3, momentum 0.1, last channel 1280.
Stochastic depth grows linearly with the block index over the whole network (torchvision's schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax

from jtkd.models import layers
from jtkd.models._misc import SqueezeExcitation, conv_norm_act, make_divisible
from jtkd.models.registry import register

Activation = Callable[[jax.Array], jax.Array]


class StageConf(NamedTuple):
    """One row of torchvision's inverted residual setting (channels and depth already scaled)."""

    fused: bool  # FusedMBConv (V2) instead of MBConv
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


def _efficientnet_conf(arch: str, width_mult: float = 1.0, depth_mult: float = 1.0) -> tuple[tuple[StageConf, ...], int | None]:
    """torchvision's `_efficientnet_conf`: the stage table and last channel width of `arch`."""

    def mb(e: float, k: int, s: int, i: int, o: int, n: int) -> StageConf:  # MBConvConfig: scales width/depth
        return StageConf(
            False, e, k, s, make_divisible(i * width_mult, 8), make_divisible(o * width_mult, 8),
            math.ceil(n * depth_mult),
        )

    def fused(e: float, k: int, s: int, i: int, o: int, n: int) -> StageConf:  # FusedMBConvConfig: no scaling
        return StageConf(True, e, k, s, make_divisible(i, 8), make_divisible(o, 8), n)

    if arch.startswith("efficientnet_b"):
        rows = [mb(1, 3, 1, 32, 16, 1), mb(6, 3, 2, 16, 24, 2), mb(6, 5, 2, 24, 40, 2), mb(6, 3, 2, 40, 80, 3),
                mb(6, 5, 1, 80, 112, 3), mb(6, 5, 2, 112, 192, 4), mb(6, 3, 1, 192, 320, 1)]
        return tuple(rows), None
    if arch == "efficientnet_v2_s":
        rows = [fused(1, 3, 1, 24, 24, 2), fused(4, 3, 2, 24, 48, 4), fused(4, 3, 2, 48, 64, 4),
                mb(4, 3, 2, 64, 128, 6), mb(6, 3, 1, 128, 160, 9), mb(6, 3, 2, 160, 256, 15)]
    elif arch == "efficientnet_v2_m":
        rows = [fused(1, 3, 1, 24, 24, 3), fused(4, 3, 2, 24, 48, 5), fused(4, 3, 2, 48, 80, 5),
                mb(4, 3, 2, 80, 160, 7), mb(6, 3, 1, 160, 176, 14), mb(6, 3, 2, 176, 304, 18),
                mb(6, 3, 1, 304, 512, 5)]
    elif arch == "efficientnet_v2_l":
        rows = [fused(1, 3, 1, 32, 32, 4), fused(4, 3, 2, 32, 64, 7), fused(4, 3, 2, 64, 96, 7),
                mb(4, 3, 2, 96, 192, 10), mb(6, 3, 1, 192, 224, 19), mb(6, 3, 2, 224, 384, 25),
                mb(6, 3, 1, 384, 640, 7)]
    else:
        raise ValueError(f"unsupported EfficientNet {arch!r}")
    return tuple(rows), 1280


class MBConv(layers.TorchModel):
    """MBConv (expand 1x1, depthwise kxk, squeeze-excitation, project 1x1) or, with `fused`,
    FusedMBConv (expand kxk, project 1x1; a single kxk conv when there is no expansion).
    Layers are the torch `block` Sequential's children `block_<i>`, numbered as torch skips absent ones."""

    fused: bool = False
    expand_ratio: float = 1.0
    kernel: int = 3
    stride: int = 1
    input_channels: int = 32
    out_channels: int = 16
    stochastic_depth_prob: float = 0.0
    norm_eps: float = 1e-5
    norm_momentum: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = {"epsilon": self.norm_eps, "momentum": self.norm_momentum, "train": train}
        expanded = make_divisible(self.input_channels * self.expand_ratio, 8)
        expand = expanded != self.input_channels
        h, i = x, 0

        def cna(
            h: jax.Array, features: int, k: int, stride: int = 1, groups: int = 1, act: Activation | None = layers.silu
        ) -> jax.Array:
            nonlocal i
            h = conv_norm_act(self, h, f"block_{i}", features, k, stride, groups, act, **norm)
            i += 1
            return h

        if self.fused:
            if expand:
                h = cna(h, expanded, self.kernel, self.stride)
                h = cna(h, self.out_channels, 1, act=None)
            else:
                h = cna(h, self.out_channels, self.kernel, self.stride)
        else:
            if expand:
                h = cna(h, expanded, 1)
            h = cna(h, expanded, self.kernel, self.stride, groups=expanded)
            # squeeze width is relative to the block input, as in torchvision
            h = SqueezeExcitation(max(1, self.input_channels // 4), layers.silu, dtype=self.dtype, name=f"block_{i}")(h)
            i += 1
            h = cna(h, self.out_channels, 1, act=None)
        if self.stride == 1 and self.input_channels == self.out_channels:
            h = layers.stochastic_depth(self, h, self.stochastic_depth_prob, train) + x
        return h


class EfficientNet(layers.TorchModel):
    """`torchvision.models.EfficientNet`: stem, the stage table's blocks, 1x1 head conv, pool, dropout, linear."""

    inverted_residual_setting: Sequence[StageConf] = _efficientnet_conf("efficientnet_b0")[0]
    last_channel: int | None = None  # None: 4x the last stage's width (V1)
    dropout: float = 0.2
    stochastic_depth_prob: float = 0.2
    norm_eps: float = 1e-5
    norm_momentum: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        norm = {"epsilon": self.norm_eps, "momentum": self.norm_momentum, "train": train}
        setting = [StageConf(*c) for c in self.inverted_residual_setting]
        x = conv_norm_act(self, x, "features_0", setting[0].input_channels, 3, 2, activation=layers.silu, **norm)
        self.feature("features.0", x)
        total_blocks = sum(c.num_layers for c in setting)
        block_id = 0
        for s, cnf in enumerate(setting, start=1):
            for j in range(cnf.num_layers):
                x = MBConv(
                    fused=cnf.fused, expand_ratio=cnf.expand_ratio, kernel=cnf.kernel,
                    stride=cnf.stride if j == 0 else 1,
                    input_channels=cnf.input_channels if j == 0 else cnf.out_channels,
                    out_channels=cnf.out_channels,
                    stochastic_depth_prob=self.stochastic_depth_prob * block_id / total_blocks,
                    norm_eps=self.norm_eps, norm_momentum=self.norm_momentum,
                    dtype=self.dtype, axis_name=self.axis_name, name=f"features_{s}_{j}",
                )(x, train)
                block_id += 1
            self.feature(f"features.{s}", x)
        last = len(setting) + 1
        width = self.last_channel if self.last_channel is not None else 4 * setting[-1].out_channels
        x = conv_norm_act(self, x, f"features_{last}", width, 1, activation=layers.silu, **norm)
        self.feature(f"features.{last}", x)
        x = self.feature("pooled", layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1))
        if self.num_classes:
            x = layers.dropout(self, x, self.dropout, train)
            init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")  # U(+-1/sqrt(out)), as torchvision
            x = self.linear(self.num_classes, kernel_init=init, name="classifier_1")(x)
        return self.logits(x)


# builder -> (width_mult, depth_mult, dropout, BatchNorm eps, BatchNorm momentum) from torchvision's builders,
# and the crop size of its DEFAULT weights (spec.input_size)
_CONFIGS = {
    "efficientnet_b0": (1.0, 1.0, 0.2, 1e-5, 0.1, 224),
    "efficientnet_b1": (1.0, 1.1, 0.2, 1e-5, 0.1, 240),
    "efficientnet_b2": (1.1, 1.2, 0.3, 1e-5, 0.1, 288),
    "efficientnet_b3": (1.2, 1.4, 0.3, 1e-5, 0.1, 300),
    "efficientnet_b4": (1.4, 1.8, 0.4, 1e-5, 0.1, 380),
    "efficientnet_b5": (1.6, 2.2, 0.4, 1e-3, 0.01, 456),
    "efficientnet_b6": (1.8, 2.6, 0.5, 1e-3, 0.01, 528),
    "efficientnet_b7": (2.0, 3.1, 0.5, 1e-3, 0.01, 600),
    "efficientnet_v2_s": (1.0, 1.0, 0.2, 1e-3, 0.1, 384),
    "efficientnet_v2_m": (1.0, 1.0, 0.3, 1e-3, 0.1, 480),
    "efficientnet_v2_l": (1.0, 1.0, 0.4, 1e-3, 0.1, 480),
}

for _name, (_w, _d, _drop, _eps, _mom, _size) in _CONFIGS.items():
    _setting, _last = _efficientnet_conf(_name, _w, _d)
    register(
        _name,
        EfficientNet,
        head="classifier.1",
        kwargs={
            "inverted_residual_setting": _setting, "last_channel": _last, "dropout": _drop,
            "norm_eps": _eps, "norm_momentum": _mom,
        },
        input_size=_size,
    )
