"""Inception v3, as `torchvision.models.inception_v3`.

Every convolution is `BasicConv2d` (conv without bias, BatchNorm eps 1e-3, ReLU; shared with GoogLeNet).
The stem and the grid reductions use unpadded convs and floor-mode pools, so inputs need >= 75 px
(and >= 299 px for the auxiliary classifier, which runs in train mode).
In train mode with `aux_logits` the model returns `InceptionOutputs(logits, aux_logits)` like torchvision;
in eval mode (or without the aux head) only the main logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtkd.models import layers
from jtkd.models.googlenet import BasicConv2d, transform_input
from jtkd.models.registry import register


class InceptionOutputs(NamedTuple):
    logits: jax.Array
    aux_logits: jax.Array


class _Block(layers.TorchModel):
    """Base of the mixed blocks: `self.c(name, features, kernel, stride, padding)` is a named BasicConv2d."""

    def c(
        self, name: str, features: int, kernel: int | Sequence[int], stride: int = 1, padding: int | Sequence[int] = 0
    ) -> BasicConv2d:
        return BasicConv2d(
            features=features, kernel_size=kernel, stride=stride, padding=padding, dtype=self.dtype,
            axis_name=self.axis_name, name=name,
        )


class InceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b1 = self.c("branch1x1", 64, 1)(x, train)
        b5 = self.c("branch5x5_2", 64, 5, padding=2)(self.c("branch5x5_1", 48, 1)(x, train), train)
        b3 = self.c("branch3x3dbl_1", 64, 1)(x, train)
        b3 = self.c("branch3x3dbl_2", 96, 3, padding=1)(b3, train)
        b3 = self.c("branch3x3dbl_3", 96, 3, padding=1)(b3, train)
        bp = self.c("branch_pool", self.pool_features, 1)(layers.avg_pool(x, 3, 1, 1), train)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b3 = self.c("branch3x3", 384, 3, stride=2)(x, train)
        bd = self.c("branch3x3dbl_1", 64, 1)(x, train)
        bd = self.c("branch3x3dbl_2", 96, 3, padding=1)(bd, train)
        bd = self.c("branch3x3dbl_3", 96, 3, stride=2)(bd, train)
        return jnp.concatenate([b3, bd, layers.max_pool(x, 3, 2)], axis=-1)


class InceptionC(_Block):
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c7 = self.channels_7x7
        b1 = self.c("branch1x1", 192, 1)(x, train)
        b7 = self.c("branch7x7_1", c7, 1)(x, train)
        b7 = self.c("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7, train)
        b7 = self.c("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7, train)
        bd = self.c("branch7x7dbl_1", c7, 1)(x, train)
        bd = self.c("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd, train)
        bd = self.c("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd, train)
        bd = self.c("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd, train)
        bd = self.c("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd, train)
        bp = self.c("branch_pool", 192, 1)(layers.avg_pool(x, 3, 1, 1), train)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b3 = self.c("branch3x3_2", 320, 3, stride=2)(self.c("branch3x3_1", 192, 1)(x, train), train)
        b7 = self.c("branch7x7x3_1", 192, 1)(x, train)
        b7 = self.c("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7, train)
        b7 = self.c("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7, train)
        b7 = self.c("branch7x7x3_4", 192, 3, stride=2)(b7, train)
        return jnp.concatenate([b3, b7, layers.max_pool(x, 3, 2)], axis=-1)


class InceptionE(_Block):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b1 = self.c("branch1x1", 320, 1)(x, train)
        b3 = self.c("branch3x3_1", 384, 1)(x, train)
        b3 = jnp.concatenate(
            [
                self.c("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3, train),
                self.c("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3, train),
            ],
            axis=-1,
        )
        bd = self.c("branch3x3dbl_1", 448, 1)(x, train)
        bd = self.c("branch3x3dbl_2", 384, 3, padding=1)(bd, train)
        bd = jnp.concatenate(
            [
                self.c("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd, train),
                self.c("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd, train),
            ],
            axis=-1,
        )
        bp = self.c("branch_pool", 192, 1)(layers.avg_pool(x, 3, 1, 1), train)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionAux(_Block):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = layers.avg_pool(x, 5, 3)
        x = self.c("conv0", 128, 1)(x, train)
        x = self.c("conv1", 768, 5)(x, train)
        x = layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1)
        return self.linear(self.num_classes, name="fc")(x)


class Inception3(layers.TorchModel):
    aux_logits: bool = True
    transform_input: bool = False
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | InceptionOutputs:
        x = x.astype(self.dtype)
        if self.transform_input:
            x = transform_input(x)
        kw = dict(dtype=self.dtype, axis_name=self.axis_name)
        c = lambda name, f, k, s=1, p=0: BasicConv2d(  # noqa: E731
            features=f, kernel_size=k, stride=s, padding=p, name=name, **kw
        )
        x = c("Conv2d_1a_3x3", 32, 3, 2)(x, train)
        x = c("Conv2d_2a_3x3", 32, 3)(x, train)
        x = c("Conv2d_2b_3x3", 64, 3, 1, 1)(x, train)
        x = layers.max_pool(x, 3, 2)
        x = c("Conv2d_3b_1x1", 80, 1)(x, train)
        x = c("Conv2d_4a_3x3", 192, 3)(x, train)
        x = self.feature("maxpool2", layers.max_pool(x, 3, 2))
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features=pool_features, name=name, **kw)(x, train)
        x = self.feature("Mixed_5d", x)
        x = InceptionB(name="Mixed_6a", **kw)(x, train)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(channels_7x7=c7, name=name, **kw)(x, train)
        x = self.feature("Mixed_6e", x)
        aux = None
        if self.aux_logits and self.num_classes and (train or self.is_initializing()):
            head = InceptionAux(num_classes=self.num_classes, name="AuxLogits", **kw)
            # torch only runs the aux head in train mode. At eval-mode init it must still run once so its
            # parameters exist (checkpoints carry them): on a dummy 17x17 map (its 299 px size) so that
            # init also works at inputs too small for the head; that output is discarded.
            if train and min(x.shape[1:3]) < 17:
                raise ValueError(
                    f"inception_v3's auxiliary classifier needs inputs of at least 299 px in train mode (its 5x5 "
                    f"conv on a 17x17 map), as in torchvision; got a {x.shape[1]}x{x.shape[2]} map. Train at 299 px, "
                    "or create the model with aux_logits=False (jtkd's fine-tuning does: its loss ignores aux logits)"
                )
            aux = head(x if train else jnp.zeros((1, 17, 17, x.shape[-1]), x.dtype), train)
            aux = aux if train else None
        x = InceptionD(name="Mixed_7a", **kw)(x, train)
        x = InceptionE(name="Mixed_7b", **kw)(x, train)
        x = self.feature("Mixed_7c", InceptionE(name="Mixed_7c", **kw)(x, train))
        x = self.feature("pooled", layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1))
        if not self.num_classes:
            return self.logits(x)
        x = layers.dropout(self, x, self.dropout, train)
        x = self.logits(self.linear(self.num_classes, name="fc")(x))
        if aux is not None:
            return InceptionOutputs(x, self.logits(aux))
        return x


register(
    "inception_v3", Inception3, head="fc", aux_heads=("AuxLogits.fc",), input_size=299, min_size=75,
    # torchvision's random init draws the fc from trunc_normal(std=0.1) without fan-in scaling over 2048
    # features, so the test's logits are ~85 even with calibrated BatchNorms; 2e-3 is ~2e-5 relative
    # (measured 6.6e-4). tests/test_inception_scaled_weights.py checks fan-in-scaled weights at 1e-6.
    atol=2e-3,
)
