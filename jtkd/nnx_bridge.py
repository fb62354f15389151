"""Converted models as Flax NNX modules, for code written against `flax.nnx`.

jtkd's models are Linen modules applied to explicit variables. `to_nnx` wraps one with its variables
in `flax.nnx.bridge.ToNNX`, so it is an ordinary stateful NNX module: `nnx.jit`, `nnx.grad`,
`nnx.Optimizer(model, tx, wrt=nnx.Param)`, `nnx.split`/`nnx.merge` and `nnx.state(model,
nnx.BatchStat)` work on it, and it computes exactly what the Linen model computes (the same apply).
`linen_variables` is the way back, to `converters.torchvision.to_torch`, `jtkd.checkpoint` or any
Linen code:

    model = to_nnx("resnet50", convert("resnet50", state_dict, head="reinit", num_classes=5))
    optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x, train=True)  # BatchNorm: batch statistics, running statistics updated
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    to_torch("resnet50", linen_variables(model))  # torchvision loads it with strict=True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import linen as nn
from flax import nnx
from flax.nnx.bridge import variables as bridge_variables


class Model(nnx.bridge.ToNNX):
    """An NNX module that applies a jtkd Linen model to the variables it holds.

    `model(x)` is inference mode, torch's `model.eval()`: BatchNorm uses its running statistics.
    `model(x, train=True)` is torch's `model.train()`: BatchNorm normalises with the batch's statistics
    and updates its running statistics in the module (flax's `ToNNX` alone would refuse, its
    `batch_stats` being immutable), and dropout draws from the module's `dropout` rng stream.
    """

    def __call__(self, x: jax.Array, train: bool = False, **kw: Any) -> Any:
        if train and "mutable" not in kw:
            kw["mutable"] = ["batch_stats"]
        return super().__call__(x, train=train, **kw)


def to_nnx(
    model: str | nn.Module, variables: Mapping[str, Any], *, rngs: nnx.Rngs | int | None = None
) -> Model:
    """`variables` (`{'params', 'batch_stats'}`, e.g. from `converters.torchvision.convert`) as an NNX module.

    `model` is a registered name, whose module is built from the variables' shapes (num_classes, ViT
    image_size, ...: `converters.torchvision.flax_module`), or a Linen module built to match them.
    `rngs` seeds the `dropout` stream used in train mode (default 0). The arrays are held, not copied.
    """
    if isinstance(model, str):
        from converters.torchvision import flax_module

        model = flax_module(model, variables)
    if not isinstance(rngs, nnx.Rngs):
        rngs = nnx.Rngs(dropout=0 if rngs is None else rngs)
    linen = {c: variables[c] for c in ("params", "batch_stats") if variables.get(c)}
    out = Model(model, rngs=rngs)
    for name, value in bridge_variables.linen_vars_to_nnx_attrs(linen).items():
        setattr(out, name, nnx.data(value))
    return out


def linen_variables(model: Model) -> dict[str, Any]:
    """The `{'params', 'batch_stats'}` a `Model` holds now, as Linen (and `to_torch`) take them."""
    attrs = {k: v for k, v in vars(model).items() if not k.startswith(("to_nnx__", "_pytree__"))}
    out = bridge_variables.nnx_attrs_to_linen_vars(attrs)
    return {"params": out.get("params", {}), "batch_stats": out.get("batch_stats", {})}


__all__ = ["Model", "linen_variables", "to_nnx"]
