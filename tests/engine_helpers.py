"""A tiny classifier and data for the engine tests (loop, checkpoints, optimizers, multi-host).

Top-level module names follow the ResNet pattern (conv1, bn1, layer1_0, layer2_0, fc) so stage
plans and freezing behave as on real models, at a fraction of the compile time.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtkd.models import layers

STAGES = (r"conv1|bn1", r"layer1_\d+", r"layer2_\d+")
HEAD = ("fc",)
SIZE = 8


class Tiny(nn.Module):
    num_classes: int = 3
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        x = layers.Conv2d(4, 3, 1, 1, bias=False, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(layers.BatchNorm(axis_name=self.axis_name, dtype=self.dtype, name="bn1")(x, train))
        x = nn.relu(layers.Conv2d(8, 3, 2, 1, dtype=self.dtype, name="layer1_0")(x))
        x = layers.BatchNorm(axis_name=self.axis_name, dtype=self.dtype, name="layer1_1")(x, train)
        x = nn.relu(layers.Conv2d(8, 3, 2, 1, dtype=self.dtype, name="layer2_0")(x))
        x = x.mean((1, 2))
        if self.num_classes:
            x = layers.Linear(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)


def init(module: nn.Module, seed: int = 0) -> dict:
    v = module.init(jax.random.key(seed), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
    return {"params": v["params"], "batch_stats": v["batch_stats"]}


def dataset(n: int, num_classes: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Learnable toy data: the class shifts the mean of one colour channel."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n).astype(np.int32)
    x = rng.standard_normal((n, SIZE, SIZE, 3)).astype(np.float32)
    x[np.arange(n), :, :, y % 3] += 1.5
    return {"image": x, "label": y}


def tree_bits(tree) -> list[np.ndarray]:
    """Leaves as raw bytes views: comparing these is a bitwise comparison (NaN and -0.0 included)."""
    return [np.atleast_1d(np.asarray(a)).view(np.uint8) for a in jax.tree.leaves(jax.device_get(tree))]


def assert_bitwise_equal(a, b) -> None:
    la, lb = tree_bits(a), tree_bits(b)
    assert jax.tree.structure(jax.device_get(a)) == jax.tree.structure(jax.device_get(b))
    assert len(la) == len(lb) > 0
    for i, (x, y) in enumerate(zip(la, lb)):
        assert x.shape == y.shape and np.array_equal(x, y), f"leaf {i} differs"
