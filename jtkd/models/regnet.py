"""RegNetX and RegNetY, as `torchvision.models.regnet`.

Stage widths, depths and group widths are generated from each builder's (depth, w_0, w_a, w_m,
group_width) by a port of torchvision's `BlockParams.from_init_params`, in float32 as torch computes
it (the quantisation rounds on float32 values, so float64 could pick other widths at a tie).
RegNetY adds squeeze-excitation whose width is 1/4 of the block's *input* width.
BatchNorm is torch's default (eps 1e-5, momentum 0.1).

Torch names the blocks `trunk_output.block1.block1-0...`: `trunk_output` and each stage are named
(not numbered) Sequentials, so they are Flax submodules here, and the hyphenated block names are
kept verbatim as Flax module names.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from jtkd.models import layers
from jtkd.models._misc import SqueezeExcitation, conv_norm_act, make_divisible
from jtkd.models.registry import register


class StageParams(NamedTuple):
    width: int
    stride: int
    depth: int
    group_width: int
    bottleneck_multiplier: float


@functools.cache
def block_params(
    depth: int, w_0: int, w_a: float, w_m: float, group_width: int, bottleneck_multiplier: float = 1.0
) -> tuple[StageParams, ...]:
    """torchvision's `BlockParams.from_init_params`: per-stage (width, stride, depth, group width, bottleneck).

    Block widths follow log(w_j) = log(w_0) + w_m-log-quantised(w_0 + j * w_a), rounded to multiples
    of 8; consecutive blocks of equal width form a stage; then widths and group widths are made
    compatible (`_adjust_widths_groups_compatibilty`).
    """
    quant, stride = 8, 2
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8 != 0:
        raise ValueError("Invalid RegNet settings")
    f32 = np.float32
    # torch: torch.arange(depth) * w_a + w_0 in float32, log/round/pow in float32 (round: half to even)
    widths_cont = np.arange(depth, dtype=f32) * f32(w_a) + f32(w_0)
    block_capacity = np.round(np.log(widths_cont / f32(w_0)) / f32(math.log(w_m)))
    block_widths = (np.round(f32(w_0) * np.power(f32(w_m), block_capacity) / f32(quant)) * quant).astype(int).tolist()
    # a new stage starts wherever the width changes
    splits = [w != wp for w, wp in zip(block_widths + [0], [0] + block_widths)]
    stage_widths = [w for w, t in zip(block_widths, splits[:-1]) if t]
    stage_depths = np.diff([d for d, t in enumerate(splits) if t]).tolist()
    # widths and group widths made compatible with the bottleneck multiplier
    w_bots = [int(w * bottleneck_multiplier) for w in stage_widths]
    group_widths = [min(group_width, w_bot) for w_bot in w_bots]
    w_bots = [make_divisible(w_bot, g) for w_bot, g in zip(w_bots, group_widths)]
    stage_widths = [int(w_bot / bottleneck_multiplier) for w_bot in w_bots]
    return tuple(
        StageParams(w, stride, d, g, bottleneck_multiplier)
        for w, d, g in zip(stage_widths, stage_depths, group_widths)
    )


class _BlockFields(layers.TorchModel):
    """The arguments torchvision's BottleneckTransform and ResBottleneckBlock share."""

    width_in: int = 32
    width_out: int = 32
    stride: int = 1
    group_width: int = 1
    bottleneck_multiplier: float = 1.0
    se_ratio: float | None = None


class BottleneckTransform(_BlockFields):
    """`f`: 1x1 `a`, grouped 3x3 `b`, optional SE `se`, 1x1 `c` (no activation)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        w_b = round(self.width_out * self.bottleneck_multiplier)
        x = conv_norm_act(self, x, "a", w_b, 1, activation=nn.relu, train=train)
        x = conv_norm_act(self, x, "b", w_b, 3, self.stride, groups=w_b // self.group_width, activation=nn.relu, train=train)
        if self.se_ratio:
            # the SE reduction is relative to the width at the start of the block
            x = SqueezeExcitation(round(self.se_ratio * self.width_in), nn.relu, dtype=self.dtype, name="se")(x)
        return conv_norm_act(self, x, "c", self.width_out, 1, train=train)


class ResBottleneckBlock(_BlockFields):
    """x + f(x), with a 1x1 projection `proj` of x when the shape changes, then ReLU."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.width_in != self.width_out or self.stride != 1:
            shortcut = conv_norm_act(self, x, "proj", self.width_out, 1, self.stride, train=train)
        else:
            shortcut = x
        f = BottleneckTransform(
            width_in=self.width_in, width_out=self.width_out, stride=self.stride, group_width=self.group_width,
            bottleneck_multiplier=self.bottleneck_multiplier, se_ratio=self.se_ratio,
            dtype=self.dtype, axis_name=self.axis_name, name="f",
        )(x, train)
        return nn.relu(shortcut + f)


class AnyStage(layers.TorchModel):
    """`block<i>`: `depth` blocks named `block<i>-<j>`; only the first one strides and changes width."""

    width_in: int = 32
    params: StageParams = StageParams(32, 2, 1, 1, 1.0)
    se_ratio: float | None = None
    stage_index: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        p = StageParams(*self.params)
        for j in range(p.depth):
            x = ResBottleneckBlock(
                width_in=self.width_in if j == 0 else p.width, width_out=p.width, stride=p.stride if j == 0 else 1,
                group_width=p.group_width, bottleneck_multiplier=p.bottleneck_multiplier, se_ratio=self.se_ratio,
                dtype=self.dtype, axis_name=self.axis_name, name=f"block{self.stage_index}-{j}",
            )(x, train)
        return x


class Trunk(layers.TorchModel):
    """`trunk_output`: the stages `block1`..., applied in order."""

    stem_width: int = 32
    stages: Sequence[StageParams] = ()
    se_ratio: float | None = None

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.stage_outputs(x, train)[-1]

    @nn.compact
    def stage_outputs(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """Every stage's output. RegNet calls this (to sow them) rather than __call__, so that the
        intermediates Flax captures for `trunk_output` stay arrays, like torch's."""
        outs, width = [], self.stem_width
        for i, p in enumerate(self.stages, start=1):
            p = StageParams(*p)
            x = AnyStage(
                width_in=width, params=p, se_ratio=self.se_ratio, stage_index=i,
                dtype=self.dtype, axis_name=self.axis_name, name=f"block{i}",
            )(x, train)
            outs.append(x)
            width = p.width
        return outs


class RegNet(layers.TorchModel):
    """`torchvision.models.RegNet` with torchvision's generator parameters as fields."""

    depth: int = 16
    w_0: int = 48
    w_a: float = 27.89
    w_m: float = 2.09
    group_width: int = 8
    bottleneck_multiplier: float = 1.0
    se_ratio: float | None = 0.25
    stem_width: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        x = conv_norm_act(self, x, "stem", self.stem_width, 3, 2, activation=nn.relu, train=train)
        self.feature("stem", x)
        stages = block_params(self.depth, self.w_0, self.w_a, self.w_m, self.group_width, self.bottleneck_multiplier)
        outs = Trunk(
            stem_width=self.stem_width, stages=stages, se_ratio=self.se_ratio,
            dtype=self.dtype, axis_name=self.axis_name, name="trunk_output",
        ).stage_outputs(x, train)
        for i, out in enumerate(outs, start=1):
            self.feature(f"trunk_output.block{i}", out)
        x = outs[-1]
        x = self.feature("pooled", layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1))
        if self.num_classes:
            x = self.linear(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="fc")(x)
        return self.logits(x)


# builder -> from_init_params arguments (depth, w_0, w_a, w_m, group_width, se_ratio), from torchvision
_CONFIGS = {
    "regnet_y_400mf": (16, 48, 27.89, 2.09, 8, 0.25),
    "regnet_y_800mf": (14, 56, 38.84, 2.4, 16, 0.25),
    "regnet_y_1_6gf": (27, 48, 20.71, 2.65, 24, 0.25),
    "regnet_y_3_2gf": (21, 80, 42.63, 2.66, 24, 0.25),
    "regnet_y_8gf": (17, 192, 76.82, 2.19, 56, 0.25),
    "regnet_y_16gf": (18, 200, 106.23, 2.48, 112, 0.25),
    "regnet_y_32gf": (20, 232, 115.89, 2.53, 232, 0.25),
    "regnet_y_128gf": (27, 456, 160.83, 2.52, 264, 0.25),
    "regnet_x_400mf": (22, 24, 24.48, 2.54, 16, None),
    "regnet_x_800mf": (16, 56, 35.73, 2.28, 16, None),
    "regnet_x_1_6gf": (18, 80, 34.01, 2.25, 24, None),
    "regnet_x_3_2gf": (25, 88, 26.31, 2.25, 48, None),
    "regnet_x_8gf": (23, 80, 49.56, 2.88, 120, None),
    "regnet_x_16gf": (22, 216, 55.59, 2.1, 128, None),
    "regnet_x_32gf": (23, 320, 69.86, 2.0, 168, None),
}

for _name, (_depth, _w0, _wa, _wm, _gw, _se) in _CONFIGS.items():
    register(
        _name,
        RegNet,
        head="fc",
        kwargs={"depth": _depth, "w_0": _w0, "w_a": _wa, "w_m": _wm, "group_width": _gw, "se_ratio": _se},
        # 644M parameters: too big for every CI run
        slow=_name == "regnet_y_128gf",
        input_size=384 if _name == "regnet_y_128gf" else 224,  # its DEFAULT weights (SWAG E2E) are 384
    )
