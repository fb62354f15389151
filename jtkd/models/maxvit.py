"""MaxViT, as `torchvision.models.maxvit`.

Each `blocks.{i}.layers.{j}` is torchvision's MaxVitLayer: `layers.MBconv` (pre-norm MBConv with SE,
BatchNorm eps 1e-3 momentum 0.01), then `layers.window_attention` (attention inside P x P windows) and
`layers.grid_attention` (attention across a P x P grid of strided positions), both with relative
position bias (`relative_position_index` is a torch buffer recomputed here). Note torchvision scales
the keys by feat_dim ** -0.5 (not head_dim): copied.

torchvision fixes the partition grids from `input_size` at construction; here they follow the actual
input, so a torch model built for `input_size` and this one agree on every input torch accepts. The
input must make each stage's map (sizes ceil(s/4), ceil(s/8), ceil(s/16), ceil(s/32)) divisible by
`partition_size`: 224 (the default), or any side in 221..224, 445..448, ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtkd.models import layers
from jtkd.models.registry import register
from jtkd.models.swin import relative_position_index

_normal02 = nn.initializers.normal(0.02)  # torchvision: normal_(std=0.02) for every conv and Linear, zero bias


def _conv_out(n: int) -> int:
    """Output side of a 3x3, stride 2, padding 1 conv (torchvision's _get_conv_output_shape)."""
    return (n - 3 + 2) // 2 + 1


class SqueezeExcitation(layers.TorchModel):
    squeeze_channels: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = x.mean((1, 2), keepdims=True)
        s = nn.silu(self.conv(self.squeeze_channels, 1, kernel_init=_normal02, name="fc1")(s))
        s = jax.nn.sigmoid(self.conv(x.shape[-1], 1, kernel_init=_normal02, name="fc2")(s))
        return x * s


class MBConvLayers(layers.TorchModel):
    """torch's `MBconv.layers`: pre_norm, conv_a (1x1), conv_b (3x3 depthwise, stride), SE, conv_c."""

    out_channels: int = 64
    expansion_ratio: float = 4.0
    squeeze_ratio: float = 0.25
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        mid = int(self.out_channels * self.expansion_ratio)
        bn = lambda name: self.norm(epsilon=1e-3, momentum=0.01, name=name)  # noqa: E731
        x = bn("pre_norm")(x, train)
        x = self.conv(mid, 1, bias=False, kernel_init=_normal02, name="conv_a_0")(x)
        x = layers.gelu(bn("conv_a_1")(x, train))
        x = self.conv(mid, 3, self.stride, 1, groups=mid, bias=False, kernel_init=_normal02, name="conv_b_0")(x)
        x = layers.gelu(bn("conv_b_1")(x, train))
        x = SqueezeExcitation(
            squeeze_channels=int(self.out_channels * self.squeeze_ratio), dtype=self.dtype, name="squeeze_excitation"
        )(x)
        return self.conv(self.out_channels, 1, kernel_init=_normal02, name="conv_c")(x)


class MBConv(layers.TorchModel):
    out_channels: int = 64
    expansion_ratio: float = 4.0
    squeeze_ratio: float = 0.25
    stride: int = 1
    p_stochastic_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        res = x
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            if self.stride == 2:  # proj = [AvgPool2d(3, 2, 1), Conv2d]
                res = self.conv(self.out_channels, 1, kernel_init=_normal02, name="proj_1")(layers.avg_pool(x, 3, 2, 1))
            else:
                res = self.conv(self.out_channels, 1, kernel_init=_normal02, name="proj_0")(x)
        y = MBConvLayers(
            out_channels=self.out_channels, expansion_ratio=self.expansion_ratio, squeeze_ratio=self.squeeze_ratio,
            stride=self.stride, dtype=self.dtype, axis_name=self.axis_name, name="layers",
        )(x, train)
        return res + layers.stochastic_depth(self, y, self.p_stochastic_dropout, train)


class RelativePositionalMultiHeadAttention(layers.TorchModel):
    head_dim: int = 32
    partition_size: int = 7

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, g, p, d = x.shape
        h, dh, s = d // self.head_dim, self.head_dim, self.partition_size
        qkv = self.linear(3 * h * dh, kernel_init=_normal02, name="to_qkv")(x)
        table = self.param(
            "relative_position_bias_table", nn.initializers.truncated_normal(0.02), ((2 * s - 1) ** 2, h), jnp.float32
        )
        n = s * s
        bias = table.astype(self.dtype)[relative_position_index(s, s)].reshape(n, n, h).transpose(2, 0, 1)[None]
        # torchvision's scale_factor is feat_dim ** -0.5 (it scales k; here the scores)
        out = layers.attention(qkv.reshape(b * g, p, 3 * d), h, bias, d**-0.5).reshape(b, g, p, d)
        return self.linear(d, kernel_init=_normal02, name="merge")(out)


class PartitionAttentionLayer(layers.TorchModel):
    """Window ("window") or grid ("grid") partition, pre-norm attention and MLP residuals, departition."""

    head_dim: int = 32
    partition_size: int = 7
    partition_type: str = "window"
    mlp_ratio: int = 4
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    p_stochastic_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, hh, ww, c = x.shape
        n_partitions = hh // self.partition_size  # torch derives both from the grid height
        p = self.partition_size if self.partition_type == "window" else n_partitions
        if p == 0 or hh % p or ww % p:
            raise ValueError(f"MaxViT: feature map {hh}x{ww} is not divisible into partitions of {p}")
        gh, gw = hh // p, ww // p
        x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p, c)
        if self.partition_type == "grid":
            x = jnp.swapaxes(x, -2, -3)
        sd = lambda y: layers.stochastic_depth(self, y, self.p_stochastic_dropout, train)  # noqa: E731

        y = layers.LayerNorm(1e-5, self.dtype, name="attn_layer_0")(x)
        y = RelativePositionalMultiHeadAttention(
            head_dim=self.head_dim, partition_size=self.partition_size, dtype=self.dtype, name="attn_layer_1"
        )(y)
        x = x + sd(layers.dropout(self, y, self.attention_dropout, train))
        y = layers.LayerNorm(1e-5, self.dtype, name="mlp_layer_0")(x)
        y = layers.gelu(self.linear(c * self.mlp_ratio, kernel_init=_normal02, name="mlp_layer_1")(y))
        y = self.linear(c, kernel_init=_normal02, name="mlp_layer_3")(y)
        x = x + sd(layers.dropout(self, y, self.mlp_dropout, train))

        if self.partition_type == "grid":
            x = jnp.swapaxes(x, -2, -3)
        return x.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * p, gw * p, c)


class MaxVitLayerBody(layers.TorchModel):
    """torch's `MaxVitLayer.layers` (an nn.Sequential of MBconv, window_attention, grid_attention)."""

    out_channels: int = 64
    stride: int = 1
    squeeze_ratio: float = 0.25
    expansion_ratio: float = 4.0
    head_dim: int = 32
    mlp_ratio: int = 4
    mlp_dropout: float = 0.0
    attention_dropout: float = 0.0
    p_stochastic_dropout: float = 0.0
    partition_size: int = 7

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, axis_name=self.axis_name)
        x = MBConv(
            out_channels=self.out_channels, expansion_ratio=self.expansion_ratio, squeeze_ratio=self.squeeze_ratio,
            stride=self.stride, p_stochastic_dropout=self.p_stochastic_dropout, name="MBconv", **kw,
        )(x, train)
        for kind in ("window", "grid"):
            x = PartitionAttentionLayer(
                head_dim=self.head_dim, partition_size=self.partition_size, partition_type=kind,
                mlp_ratio=self.mlp_ratio, attention_dropout=self.attention_dropout, mlp_dropout=self.mlp_dropout,
                p_stochastic_dropout=self.p_stochastic_dropout, name=f"{kind}_attention", **kw,
            )(x, train)
        return x


class MaxVitLayer(MaxVitLayerBody):
    """torch's MaxVitLayer: its only child is the `layers` Sequential (hence the extra level)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(MaxVitLayerBody) if f.init}
        fields.pop("parent", None)
        fields.pop("name", None)
        return MaxVitLayerBody(**fields, name="layers")(x, train)


class MaxVitBlock(MaxVitLayerBody):
    """torch's MaxVitBlock: `layers.{j}` MaxVitLayers, the first one with stride 2."""

    n_layers: int = 2
    p_stochastic: Sequence[float] = (0.0, 0.0)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(MaxVitLayerBody) if f.init}
        for k in ("parent", "name", "stride", "p_stochastic_dropout"):
            fields.pop(k, None)
        for j in range(self.n_layers):
            x = MaxVitLayer(
                **fields, stride=2 if j == 0 else 1, p_stochastic_dropout=self.p_stochastic[j], name=f"layers_{j}"
            )(x, train)
        return x


class MaxVit(layers.TorchModel):
    input_size: Sequence[int] = (224, 224)  # torchvision's argument; the grids follow the actual input here
    stem_channels: int = 64
    partition_size: int = 7
    block_channels: Sequence[int] = (64, 128, 256, 512)
    block_layers: Sequence[int] = (2, 2, 5, 2)
    head_dim: int = 32
    stochastic_depth_prob: float = 0.2
    squeeze_ratio: float = 0.25
    expansion_ratio: float = 4.0
    mlp_ratio: int = 4
    mlp_dropout: float = 0.0
    attention_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        h, w = _conv_out(x.shape[1]), _conv_out(x.shape[2])
        sizes = []
        for _ in self.block_channels:
            h, w = _conv_out(h), _conv_out(w)
            sizes.append((h, w))
        if any(s % self.partition_size for hw in sizes for s in hw):
            raise ValueError(
                f"MaxViT: input {x.shape[1]}x{x.shape[2]} gives block input sizes {sizes}, which are not all "
                f"divisible by partition_size {self.partition_size}"
            )
        x = self.conv(self.stem_channels, 3, 2, 1, bias=False, kernel_init=_normal02, name="stem_0_0")(x)
        x = layers.gelu(self.norm(epsilon=1e-3, momentum=0.01, name="stem_0_1")(x, train))
        x = self.conv(self.stem_channels, 3, 1, 1, kernel_init=_normal02, name="stem_1_0")(x)
        x = self.feature("stem", x)
        p_stochastic = np.linspace(0, self.stochastic_depth_prob, sum(self.block_layers)).tolist()
        idx = 0
        for i, (channels, n_layers) in enumerate(zip(self.block_channels, self.block_layers)):
            x = MaxVitBlock(
                out_channels=channels, n_layers=n_layers, p_stochastic=tuple(p_stochastic[idx : idx + n_layers]),
                squeeze_ratio=self.squeeze_ratio, expansion_ratio=self.expansion_ratio, head_dim=self.head_dim,
                mlp_ratio=self.mlp_ratio, mlp_dropout=self.mlp_dropout, attention_dropout=self.attention_dropout,
                partition_size=self.partition_size, dtype=self.dtype, axis_name=self.axis_name, name=f"blocks_{i}",
            )(x, train)
            x = self.feature(f"blocks.{i}", x)
            idx += n_layers
        x = layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1)
        x = layers.LayerNorm(1e-5, self.dtype, name="classifier_2")(x)
        x = jnp.tanh(self.linear(x.shape[-1], kernel_init=_normal02, name="classifier_3")(x))
        x = self.feature("pooled", x)  # the input of the final (bias-free) classifier Linear
        if self.num_classes:
            x = self.linear(self.num_classes, bias=False, kernel_init=_normal02, name="classifier_5")(x)
        return self.logits(x)


register(
    "maxvit_t",
    MaxVit,
    head="classifier.5",
    min_size=221,
    derived_buffers=(r".*\.relative_position_index",),
    # stage inputs must be multiples of the 7x7 partitions: 221x223 gives the same 56/28/14/7 grids as 224
    # (sides round up through the stride-2 convs), so it is the odd non-224 size that torch's 224 model accepts
    test_size=(221, 223),
)
