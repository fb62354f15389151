"""DenseNet 121/161/169/201, as `torchvision.models.densenet` (DenseNet-BC).

torch nests everything under `features` (a Sequential with named children: conv0, norm0,
denseblock<i>, transition<i>, norm5), so the Flax tree is features/denseblock1/denselayer1/norm1.
Old checkpoints name the dense layers' modules `norm.1`, `conv.2`...; torchvision renames them on
load (`densenet._load_state_dict`) and so do this family's key_fixups.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtkd.models import layers
from jtkd.models.registry import register

kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # torchvision: kaiming_normal_


class _DenseLayer(layers.TorchModel):
    growth_rate: int = 32
    bn_size: int = 4
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(self.norm(name="norm1")(x, train))
        x = self.conv(self.bn_size * self.growth_rate, 1, bias=False, kernel_init=kaiming_normal, name="conv1")(x)
        x = nn.relu(self.norm(name="norm2")(x, train))
        x = self.conv(self.growth_rate, 3, 1, 1, bias=False, kernel_init=kaiming_normal, name="conv2")(x)
        return layers.dropout(self, x, self.drop_rate, train)


class _DenseBlock(layers.TorchModel):
    """torch's _DenseBlock (a ModuleDict of denselayer<j>): each layer sees all earlier outputs."""

    n_layers: int = 6
    growth_rate: int = 32
    bn_size: int = 4
    drop_rate: float = 0.0
    memory_efficient: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # memory_efficient: torch checkpoints each layer's bottleneck; remat the layer (same numbers)
        layer_cls = nn.remat(_DenseLayer, static_argnums=(2,)) if self.memory_efficient else _DenseLayer
        feats = [x]
        for j in range(self.n_layers):
            feats.append(
                layer_cls(
                    growth_rate=self.growth_rate, bn_size=self.bn_size, drop_rate=self.drop_rate, dtype=self.dtype,
                    axis_name=self.axis_name, name=f"denselayer{j + 1}",
                )(jnp.concatenate(feats, axis=-1), train)
            )
        return jnp.concatenate(feats, axis=-1)


class _Transition(layers.TorchModel):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(self.norm(name="norm")(x, train))
        x = self.conv(x.shape[-1] // 2, 1, bias=False, kernel_init=kaiming_normal, name="conv")(x)
        return layers.avg_pool(x, 2, 2)


class _DenseConfig(layers.TorchModel):
    """DenseNet's architecture arguments, shared by the model and its `features` Sequential."""

    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    drop_rate: float = 0.0
    memory_efficient: bool = False


class _DenseFeatures(_DenseConfig):
    """torch's `features` Sequential; returns the final map and the dense blocks' outputs."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        sub = dict(dtype=self.dtype, axis_name=self.axis_name)
        x = self.conv(self.num_init_features, 7, 2, 3, bias=False, kernel_init=kaiming_normal, name="conv0")(x)
        x = layers.max_pool(nn.relu(self.norm(name="norm0")(x, train)), 3, 2, 1)
        stages: dict[str, jax.Array] = {}
        for i, n_layers in enumerate(self.block_config):
            x = _DenseBlock(
                n_layers=n_layers, growth_rate=self.growth_rate, bn_size=self.bn_size, drop_rate=self.drop_rate,
                memory_efficient=self.memory_efficient, name=f"denseblock{i + 1}", **sub,
            )(x, train)
            stages[f"features.denseblock{i + 1}"] = x
            if i != len(self.block_config) - 1:
                x = _Transition(name=f"transition{i + 1}", **sub)(x, train)
        return self.norm(name="norm5")(x, train), stages


class DenseNet(_DenseConfig):
    """DenseNet-BC; the dense blocks' outputs are the named features `features.denseblock1`..."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(_DenseConfig) if f.name not in ("parent", "name")}
        x, stages = _DenseFeatures(**{**config, "num_classes": 0}, name="features")(x, train)
        for k, v in stages.items():
            self.feature(k, v)
        x = self.feature("pooled", layers.adaptive_avg_pool(nn.relu(x), 1).reshape(x.shape[0], -1))
        if self.num_classes:
            x = self.linear(self.num_classes, name="classifier")(x)
        return self.logits(x)


# legacy checkpoints: `...denselayerN.norm.1.weight` -> `...denselayerN.norm1.weight` (torchvision's regex)
_LEGACY_KEYS = (
    (r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$",
     r"\1\2.\3"),
)

_CONFIGS = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}

for _name, (_growth, _blocks, _init) in _CONFIGS.items():
    register(
        _name,
        DenseNet,
        head="classifier",
        kwargs=dict(growth_rate=_growth, block_config=_blocks, num_init_features=_init),
        key_fixups=_LEGACY_KEYS,
        min_size=29,
    )
