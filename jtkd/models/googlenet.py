"""GoogLeNet (Inception v1), as `torchvision.models.googlenet`.

Copies torchvision exactly, including its known deviation from the paper: the "5x5" branch of each
inception block is a 3x3 convolution (pytorch/vision#906), and every max pool uses `ceil_mode`.
BatchNorm eps is 1e-3 (`BasicConv2d`, shared with Inception v3).

In train mode with `aux_logits` the model returns `GoogLeNetOutputs(logits, aux_logits2, aux_logits1)`
like torchvision; in eval mode (or without aux heads) only the main logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtkd.models import layers
from jtkd.models.registry import register


class GoogLeNetOutputs(NamedTuple):
    logits: jax.Array
    aux_logits2: jax.Array
    aux_logits1: jax.Array


class BasicConv2d(layers.TorchModel):
    """conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU; torch children `conv`, `bn`."""

    features: int = 64
    kernel_size: int | Sequence[int] = 1
    stride: int | Sequence[int] = 1
    padding: int | Sequence[int] = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.conv(self.features, self.kernel_size, self.stride, self.padding, bias=False, name="conv")(x)
        return nn.relu(self.norm(epsilon=1e-3, name="bn")(x, train))


def transform_input(x: jax.Array) -> jax.Array:
    """torchvision's `_transform_input` (NHWC): ImageNet-normalised input -> the (x - 0.5) / 0.5 scaling
    the ported Google weights expect."""
    mean = jnp.asarray([0.485, 0.456, 0.406], x.dtype)
    std = jnp.asarray([0.229, 0.224, 0.225], x.dtype)
    return x * (std / 0.5) + (mean - 0.5) / 0.5


class Inception(layers.TorchModel):
    ch1x1: int = 64
    ch3x3red: int = 96
    ch3x3: int = 128
    ch5x5red: int = 16
    ch5x5: int = 32
    pool_proj: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = lambda f, k, p, name: BasicConv2d(  # noqa: E731
            features=f, kernel_size=k, padding=p, dtype=self.dtype, axis_name=self.axis_name, name=name
        )
        b1 = conv(self.ch1x1, 1, 0, "branch1")(x, train)
        b2 = conv(self.ch3x3red, 1, 0, "branch2_0")(x, train)
        b2 = conv(self.ch3x3, 3, 1, "branch2_1")(b2, train)
        b3 = conv(self.ch5x5red, 1, 0, "branch3_0")(x, train)
        b3 = conv(self.ch5x5, 3, 1, "branch3_1")(b3, train)  # 3x3, not 5x5: torchvision's known bug, kept
        b4 = layers.max_pool(x, 3, 1, 1, ceil_mode=True)
        b4 = conv(self.pool_proj, 1, 0, "branch4_1")(b4, train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(layers.TorchModel):
    dropout: float = 0.7

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = layers.adaptive_avg_pool(x, 4)
        x = BasicConv2d(features=128, dtype=self.dtype, axis_name=self.axis_name, name="conv")(x, train)
        x = layers.torch_flatten(x)  # fc1 sees torch's NCHW order
        x = nn.relu(self.linear(1024, name="fc1")(x))
        x = layers.dropout(self, x, self.dropout, train)
        return self.linear(self.num_classes, name="fc2")(x)


_BLOCK_FIELDS = ("ch1x1", "ch3x3red", "ch3x3", "ch5x5red", "ch5x5", "pool_proj")
_BLOCKS = {  # _BLOCK_FIELDS per block, as torchvision
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNet(layers.TorchModel):
    aux_logits: bool = True
    transform_input: bool = False
    dropout: float = 0.2
    dropout_aux: float = 0.7

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | GoogLeNetOutputs:
        x = x.astype(self.dtype)
        if self.transform_input:
            x = transform_input(x)
        kw = dict(dtype=self.dtype, axis_name=self.axis_name)
        x = BasicConv2d(features=64, kernel_size=7, stride=2, padding=3, name="conv1", **kw)(x, train)
        x = layers.max_pool(x, 3, 2, ceil_mode=True)
        x = BasicConv2d(features=64, kernel_size=1, name="conv2", **kw)(x, train)
        x = BasicConv2d(features=192, kernel_size=3, padding=1, name="conv3", **kw)(x, train)
        x = self.feature("maxpool2", layers.max_pool(x, 3, 2, ceil_mode=True))

        block = lambda name, y: Inception(**dict(zip(_BLOCK_FIELDS, _BLOCKS[name])), name=name, **kw)(y, train)  # noqa: E731
        x = self.feature("inception3b", block("inception3b", block("inception3a", x)))
        x = layers.max_pool(x, 3, 2, ceil_mode=True)
        x = block("inception4a", x)
        aux1 = self._aux("aux1", x, train)
        x = block("inception4d", block("inception4c", block("inception4b", x)))
        aux2 = self._aux("aux2", x, train)
        x = self.feature("inception4e", block("inception4e", x))
        x = layers.max_pool(x, 2, 2, ceil_mode=True)
        x = self.feature("inception5b", block("inception5b", block("inception5a", x)))

        x = self.feature("pooled", layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1))
        if not self.num_classes:
            return self.logits(x)
        x = layers.dropout(self, x, self.dropout, train)
        x = self.logits(self.linear(self.num_classes, name="fc")(x))
        if train and aux1 is not None:
            return GoogLeNetOutputs(x, self.logits(aux2), self.logits(aux1))
        return x

    def _aux(self, name: str, x: jax.Array, train: bool) -> jax.Array | None:
        """An auxiliary head's logits in train mode. At eval-mode init it still runs once so that its
        parameters exist (checkpoints carry them); its output is then discarded, as torch never computes it."""
        if not (self.aux_logits and self.num_classes) or not (train or self.is_initializing()):
            return None
        head = InceptionAux(
            num_classes=self.num_classes, dropout=self.dropout_aux, dtype=self.dtype, axis_name=self.axis_name,
            name=name,
        )
        out = head(x, train)
        return out if train else None


register("googlenet", GoogLeNet, head="fc", aux_heads=("aux1.fc2", "aux2.fc2"), min_size=15)
