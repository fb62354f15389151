"""MobileNetV2 and MobileNetV3 (large, small), as `torchvision.models.mobilenetv2/mobilenetv3`.

torch's `features` is a flat Sequential, so its entries are the top-level Flax modules
`features_<i>`; inside a block, torch's Conv2dNormActivation `conv.0` (or `block.0`) is the conv
`conv_0_0` + norm `conv_0_1` pair. MobileNetV3's squeeze-excitation is a real submodule
(`block_<j>` with `fc1`/`fc2`) and its BatchNorms use eps 1e-3, momentum 0.01 (torch convention).
With num_classes=0 the head (the last Linear) is dropped: V2 returns the pooled 1280-d features,
V3 the output of its pre-logits Linear + Hardswish (`classifier.0`, e.g. 1280-d for large).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from jtkd.models import layers
from jtkd.models.registry import register

_linear_init = nn.initializers.normal(0.01)  # torchvision: normal_(0, 0.01), zero bias


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision `_make_divisible`: round to a multiple of divisor, never down by more than 10%."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_norm_act(
    mod: layers.TorchModel,
    x: jax.Array,
    features: int,
    kernel_size: int,
    train: bool,
    name: str,
    *,
    stride: int = 1,
    groups: int = 1,
    dilation: int = 1,
    act: Callable[[jax.Array], jax.Array] | None = None,
    norm_kw: Mapping[str, Any] = {},  # noqa: B006  read-only
) -> jax.Array:
    """torchvision Conv2dNormActivation: bias-free conv `<name>_0`, BatchNorm `<name>_1`, then `act`."""
    pad = (kernel_size - 1) // 2 * dilation
    x = mod.conv(features, kernel_size, stride, pad, groups=groups, dilation=dilation, bias=False, name=f"{name}_0")(x)
    x = mod.norm(name=f"{name}_1", **norm_kw)(x, train)
    return act(x) if act is not None else x


# ---------------------------------------------------------------------------------------- V2
class InvertedResidualV2(layers.TorchModel):
    out_channels: int = 16
    stride: int = 1
    expand_ratio: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        inp = x.shape[-1]
        hidden = int(round(inp * self.expand_ratio))
        y, i = x, 0
        if self.expand_ratio != 1:
            y = conv_norm_act(self, y, hidden, 1, train, "conv_0", act=layers.relu6)
            i = 1
        y = conv_norm_act(self, y, hidden, 3, train, f"conv_{i}", stride=self.stride, groups=hidden, act=layers.relu6)
        y = self.conv(self.out_channels, 1, bias=False, name=f"conv_{i + 1}")(y)
        y = self.norm(name=f"conv_{i + 2}")(y, train)
        return x + y if self.stride == 1 and inp == self.out_channels else y


_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(layers.TorchModel):
    """`inverted_residual_setting`: rows (expand t, channels c, repeats n, first stride s) as torchvision."""

    width_mult: float = 1.0
    inverted_residual_setting: Sequence[Sequence[int]] | None = None
    round_nearest: int = 8
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        setting = self.inverted_residual_setting or _V2_SETTING
        if len(setting) == 0 or len(setting[0]) != 4:
            raise ValueError(f"inverted_residual_setting should be non-empty or a 4-element list, got {setting}")
        sub = dict(dtype=self.dtype, axis_name=self.axis_name)
        x = conv_norm_act(self, x, make_divisible(32 * self.width_mult, self.round_nearest), 3, train, "features_0",
                          stride=2, act=layers.relu6)
        self.feature("features.0", x)
        i = 1
        for t, c, n, s in setting:
            out = make_divisible(c * self.width_mult, self.round_nearest)
            for j in range(n):
                x = InvertedResidualV2(out_channels=out, stride=s if j == 0 else 1, expand_ratio=t, name=f"features_{i}",
                                       **sub)(x, train)
                self.feature(f"features.{i}", x)
                i += 1
        last = make_divisible(1280 * max(1.0, self.width_mult), self.round_nearest)
        x = conv_norm_act(self, x, last, 1, train, f"features_{i}", act=layers.relu6)
        self.feature(f"features.{i}", x)
        x = self.feature("pooled", layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1))
        if self.num_classes:
            x = layers.dropout(self, x, self.dropout, train)
            x = self.linear(self.num_classes, kernel_init=_linear_init, name="classifier_1")(x)
        return self.logits(x)


# ---------------------------------------------------------------------------------------- V3
_V3_BN = {"epsilon": 1e-3, "momentum": 0.01}


class SqueezeExcitation(layers.TorchModel):
    """torchvision.ops.SqueezeExcitation with MobileNetV3's ReLU / Hardsigmoid."""

    squeeze_channels: int = 8

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = x.mean(axis=(1, 2), keepdims=True)
        s = nn.relu(self.conv(self.squeeze_channels, 1, name="fc1")(s))
        s = layers.hardsigmoid(self.conv(x.shape[-1], 1, name="fc2")(s))
        return s * x


class InvertedResidualV3(layers.TorchModel):
    kernel: int = 3
    expanded_channels: int = 16
    out_channels: int = 16
    use_se: bool = False
    use_hs: bool = False
    stride: int = 1
    dilation: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = layers.hardswish if self.use_hs else nn.relu
        inp, exp = x.shape[-1], self.expanded_channels
        y, j = x, 0
        if exp != inp:
            y = conv_norm_act(self, y, exp, 1, train, "block_0", act=act, norm_kw=_V3_BN)
            j = 1
        y = conv_norm_act(self, y, exp, self.kernel, train, f"block_{j}", stride=1 if self.dilation > 1 else self.stride,
                          groups=exp, dilation=self.dilation, act=act, norm_kw=_V3_BN)
        j += 1
        if self.use_se:
            y = SqueezeExcitation(squeeze_channels=make_divisible(exp // 4, 8), dtype=self.dtype, name=f"block_{j}")(y)
            j += 1
        y = conv_norm_act(self, y, self.out_channels, 1, train, f"block_{j}", norm_kw=_V3_BN)
        return y + x if self.stride == 1 and inp == self.out_channels else y


# (input, kernel, expanded, out, use_se, activation, stride, dilated); `/r` channels shrink with reduced_tail
_V3_SETTINGS: dict[str, tuple[tuple, ...]] = {
    "large": (
        (16, 3, 16, 16, False, "RE", 1, False),
        (16, 3, 64, 24, False, "RE", 2, False),
        (24, 3, 72, 24, False, "RE", 1, False),
        (24, 5, 72, 40, True, "RE", 2, False),
        (40, 5, 120, 40, True, "RE", 1, False),
        (40, 5, 120, 40, True, "RE", 1, False),
        (40, 3, 240, 80, False, "HS", 2, False),
        (80, 3, 200, 80, False, "HS", 1, False),
        (80, 3, 184, 80, False, "HS", 1, False),
        (80, 3, 184, 80, False, "HS", 1, False),
        (80, 3, 480, 112, True, "HS", 1, False),
        (112, 3, 672, 112, True, "HS", 1, False),
        (112, 5, 672, "160/r", True, "HS", 2, True),
        ("160/r", 5, "960/r", "160/r", True, "HS", 1, True),
        ("160/r", 5, "960/r", "160/r", True, "HS", 1, True),
    ),
    "small": (
        (16, 3, 16, 16, True, "RE", 2, False),
        (16, 3, 72, 24, False, "RE", 2, False),
        (24, 3, 88, 24, False, "RE", 1, False),
        (24, 5, 96, 40, True, "HS", 2, False),
        (40, 5, 240, 40, True, "HS", 1, False),
        (40, 5, 240, 40, True, "HS", 1, False),
        (40, 5, 120, 48, True, "HS", 1, False),
        (48, 5, 144, 48, True, "HS", 1, False),
        (48, 5, 288, "96/r", True, "HS", 2, True),
        ("96/r", 5, "576/r", "96/r", True, "HS", 1, True),
        ("96/r", 5, "576/r", "96/r", True, "HS", 1, True),
    ),
}
_V3_LAST_CHANNEL = {"large": 1280, "small": 1024}  # before reduced_tail / width_mult


class MobileNetV3(layers.TorchModel):
    """`arch` is "large" or "small"; width_mult, reduced_tail, dilated as torchvision's builders."""

    arch: str = "large"
    width_mult: float = 1.0
    reduced_tail: bool = False
    dilated: bool = False
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        r = 2 if self.reduced_tail else 1
        ch = lambda c: make_divisible((int(c[:-2]) // r if isinstance(c, str) else c) * self.width_mult, 8)  # noqa: E731
        setting = _V3_SETTINGS[self.arch]
        sub = dict(dtype=self.dtype, axis_name=self.axis_name)
        x = conv_norm_act(self, x, ch(setting[0][0]), 3, train, "features_0", stride=2, act=layers.hardswish,
                          norm_kw=_V3_BN)
        self.feature("features.0", x)
        for i, (_, k, exp, out, se, act, s, dil) in enumerate(setting, start=1):
            x = InvertedResidualV3(
                kernel=k, expanded_channels=ch(exp), out_channels=ch(out), use_se=se, use_hs=act == "HS", stride=s,
                dilation=2 if dil and self.dilated else 1, name=f"features_{i}", **sub,
            )(x, train)
            self.feature(f"features.{i}", x)
        i = len(setting) + 1
        x = conv_norm_act(self, x, 6 * x.shape[-1], 1, train, f"features_{i}", act=layers.hardswish, norm_kw=_V3_BN)
        self.feature(f"features.{i}", x)
        x = layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1)
        last_channel = make_divisible(_V3_LAST_CHANNEL[self.arch] // r * self.width_mult, 8)
        x = layers.hardswish(self.linear(last_channel, kernel_init=_linear_init, name="classifier_0")(x))
        x = self.feature("pooled", x)
        if self.num_classes:  # the dropout right before the head belongs to it
            x = layers.dropout(self, x, self.dropout, train)
            x = self.linear(self.num_classes, kernel_init=_linear_init, name="classifier_3")(x)
        return self.logits(x)


register("mobilenet_v2", MobileNetV2, head="classifier.1", min_size=1)
register("mobilenet_v3_large", MobileNetV3, head="classifier.3", kwargs=dict(arch="large"), min_size=1)
register("mobilenet_v3_small", MobileNetV3, head="classifier.3", kwargs=dict(arch="small"), min_size=1)
