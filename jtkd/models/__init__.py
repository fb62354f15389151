"""Flax re-implementations of the torchvision classification models.

    model = jtkd.models.create("resnet50", num_classes=10)
    logits = model.apply(variables, images_nhwc, train=False)

Every module in this package that calls `registry.register` is imported here, so a new family
is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtkd.models.layers import collect_features, xla_operations
from jtkd.models.registry import ModelSpec, get_spec, registered

_NOT_FAMILIES = {"layers", "registry"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _NOT_FAMILIES and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")


def list_models() -> list[str]:
    """The torchvision builder names jtkd implements."""
    return sorted(registered())


def create(name: str, num_classes: int = 1000, **kw: Any) -> nn.Module:
    """The Flax module for torchvision builder `name`.

    `num_classes=0` returns pooled features instead of logits. Other keywords: `dtype` (compute
    dtype), `axis_name` (sync BatchNorm over a mesh axis), and the builder's own arguments
    (e.g. `dropout`, `aux_logits`).
    """
    spec = get_spec(name)
    return spec.module(num_classes=num_classes, **{**spec.kwargs, **kw})


def check_input_size(name: str, size: int) -> None:
    """ValueError unless torchvision's model `name` accepts `size` x `size` inputs (its spec's min_size
    and size_multiple)."""
    spec = get_spec(name)
    if size < spec.min_size:
        raise ValueError(
            f"{name} needs inputs of at least {spec.min_size} px (as in torchvision); image_size is {size}"
        )
    if size % spec.size_multiple:
        raise ValueError(
            f"{name} takes inputs whose side is a multiple of {spec.size_multiple} px; image_size is {size}"
        )


def input_size(name: str, model_kw: Mapping[str, Any] | None = None) -> int:
    """The evaluation input size of `name` built with `model_kw`: the size its kwargs fix (a ViT's
    image_size, e.g. 384 or 518 for torchvision's SWAG weights), else torchvision's default."""
    spec = get_spec(name)
    return int((model_kw or {}).get(spec.size_kwarg) or spec.input_size) if spec.size_kwarg else spec.input_size


def smallest_size(name: str, at_least: int = 1) -> int:
    """The smallest input side >= `at_least` that `name` accepts (its min_size and size_multiple)."""
    spec = get_spec(name)
    size = max(at_least, spec.min_size)
    return -(-size // spec.size_multiple) * spec.size_multiple


def size_kwargs(name: str, size: int) -> dict[str, Any]:
    """Builder kwargs for `size` x `size` inputs: ViT's image_size, nothing for models of any input size."""
    spec = get_spec(name)
    return {spec.size_kwarg: size} if spec.size_kwarg else {}


def at_size(name: str, variables: Mapping[str, Any], size: int) -> Any:
    """`variables` for `size` x `size` inputs: ViT's positional embeddings resampled as torchvision's
    `interpolate_embeddings` does (the usual way to fine-tune at another resolution); any other model's
    variables are returned as they are."""
    check_input_size(name, size)
    resize = get_spec(name).resize
    return resize(variables, size) if resize is not None else variables


def num_classes(name: str, variables: Mapping[str, Any]) -> int:
    """The number of outputs of the classifier in `variables` (0 if it has none)."""
    node: Any = variables["params"]
    for part in get_spec(name).head_path:
        if not isinstance(node, Mapping) or part not in node:
            return 0
        node = node[part]
    leaf = node.get("bias", node.get("kernel")) if isinstance(node, Mapping) else None
    return int(jnp.shape(leaf)[-1]) if leaf is not None else 0


def has_aux(name: str) -> bool:
    """Whether the model has auxiliary classifiers (googlenet, inception_v3: `aux_logits`, run in train mode)."""
    return bool(get_spec(name).aux_heads)


def aux_heads(name: str, params: Mapping[str, Any]) -> list[str]:
    """Top-level names of the auxiliary classifiers present in `params` (googlenet's aux1/aux2,
    inception_v3's AuxLogits), from the spec's `aux_heads`."""
    return [k for k in dict.fromkeys(h.split(".")[0] for h in get_spec(name).aux_heads) if k in params]


def init(name_or_module: str | nn.Module, rng: jax.Array, size: int | None = None, **kw: Any) -> dict:
    """Freshly initialised variables ({'params', 'batch_stats'}) for a model."""
    if isinstance(name_or_module, str):
        size = size or get_spec(name_or_module).input_size
        name_or_module = create(name_or_module, **{**size_kwargs(name_or_module, size), **kw})
    size = size or 224
    variables = name_or_module.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def shapes(name_or_module: str | nn.Module, size: int | None = None, **kw: Any) -> dict:
    """`init`'s variables as jax.ShapeDtypeStruct leaves, computing nothing (jax.eval_shape).

    Traced on XLA's own operations, with nested jits inlined: the CPU routing (oneDNN calls, custom
    VJPs) changes how a model computes, never its variables, and jax.random's per-shape jits cost
    more to trace than their operations (resnet50: 0.36-0.55 s against 0.48-0.89 s, bench/FINDINGS.md).
    """
    with xla_operations(), jax.disable_jit():
        return jax.eval_shape(lambda: init(name_or_module, jax.random.key(0), size, **kw))


def features(model: nn.Module, variables: dict, x: jax.Array, train: bool = False, **kw: Any) -> tuple[jax.Array, dict]:
    """Logits and the named intermediate outputs of one forward pass.

    Names are the torchvision module paths whose outputs they are ('layer3', 'features.6',
    'trunk_output.block2', 'Mixed_6e', 'encoder', ...), so torch hooks or
    `torchvision.models.feature_extraction` give a torch teacher's matching tensors by the same name
    (NHWC here, NCHW there); 'pooled' is the classifier's input. tests/test_parity.py checks each
    against the torch module's output.
    """
    out, state = model.apply(variables, x, train=train, mutable=["features"], **kw)
    return out, collect_features(state["features"])


__all__ = [
    "ModelSpec", "at_size", "aux_heads", "check_input_size", "collect_features", "create", "features", "get_spec",
    "has_aux", "init", "input_size", "list_models", "num_classes", "shapes", "size_kwargs", "smallest_size",
]
