"""The one registry: torchvision builder name -> Flax module and the facts its key map needs.

Adding an architecture touches one place: its family module calls `register(...)`, and both the
model factory (`jtkd.models.create`) and the converters (`converters.torchvision`) read the spec.

Key maps are mechanical: a torch key `layer1.0.downsample.1.weight` names the Flax module path
`layer1_0/downsample_1` (a numeric component joins the one before it with '_'); the leaf `weight`
becomes `kernel` (transposed) or `scale`, `running_mean`/`running_var` become the `batch_stats`
leaves `mean`/`var`, and any other leaf keeps its torch name and shape. A spec only lists what
cannot be mechanical: renames of legacy torch keys, and torch buffers that Flax recomputes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    module: Callable[..., nn.Module]
    kwargs: Mapping[str, Any]
    head: str  # torch module path of the layer whose output is `num_classes` (e.g. "fc")
    aux_heads: tuple[str, ...] = ()  # auxiliary classifiers' output layers: num_classes outputs too
    input_size: int = 224  # torchvision's default evaluation size
    min_size: int = 1  # smallest input side torchvision's model accepts, train and eval (tests/test_min_size.py)
    size_multiple: int = 1  # input sides must be multiples of this (ViT: the patch size)
    # Models whose parameters fix the input size (ViT's positional embeddings): the builder kwarg that sets
    # it, and (variables, size) -> the variables resized for `size` x `size` inputs
    size_kwarg: str = ""
    resize: Callable[[Mapping[str, Any], int], Mapping[str, Any]] | None = None
    # regex -> replacement applied to torch keys before mapping (legacy checkpoints torchvision's load hooks fix)
    key_fixups: tuple[tuple[str, str], ...] = ()
    # regexes of torch buffers that are recomputed in Flax (consumed on import, regenerated on export)
    derived_buffers: tuple[str, ...] = ()
    # torch state_dict (key -> shape) -> builder kwargs it implies, beyond num_classes; with aux_heads
    # it defaults to aux_logits = whether the first aux head's module is in the state_dict
    infer_kwargs: Callable[[Mapping[str, tuple[int, ...]]], dict[str, Any]] | None = None
    # (name, **jtkd kwargs) -> the torchvision nn.Module, where jtkd's kwargs are not torchvision's
    # builder kwargs (MNASNet's legacy_stem); None: torchvision.models.get_model(name, weights=None, **kw)
    torch_builder: Callable[..., Any] | None = None
    family: str = ""
    # testing: an input size the architecture accepts (odd where it can be), the logit tolerance
    # (1e-4 unless the family's docstring justifies more), and whether it is too big for every CI run
    test_size: tuple[int, int] = (97, 131)
    atol: float = 1e-4
    slow: bool = False

    @property
    def head_path(self) -> tuple[str, ...]:
        """The classifier's module path in the Flax params: ('fc',), ('classifier_1',), ('heads', 'head')."""
        return flax_path(self.head + ".weight")[:-1]


def flax_path(torch_key: str) -> tuple[str, ...]:
    """`layer1.0.downsample.1.weight` -> ('layer1_0', 'downsample_1', 'weight'): numeric parts join the one before."""
    out: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, module: Callable[..., nn.Module], *, head: str, **spec_kw: Any) -> ModelSpec:
    kwargs = spec_kw.pop("kwargs", {})
    spec_kw.setdefault("family", getattr(module, "__module__", "").rsplit(".", 1)[-1])
    if spec_kw.get("aux_heads") and spec_kw.get("infer_kwargs") is None:
        spec_kw["infer_kwargs"] = _aux_logits_if_present(spec_kw["aux_heads"][0].split(".")[0] + ".")
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    spec = ModelSpec(name=name, module=module, kwargs=dict(kwargs), head=head, **spec_kw)
    _REGISTRY[name] = spec
    return spec


def _aux_logits_if_present(prefix: str) -> Callable[[Mapping[str, tuple[int, ...]]], dict[str, Any]]:
    def infer(state_dict: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        return {"aux_logits": any(k.startswith(prefix) for k in state_dict)}

    return infer


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; supported torchvision builders: {', '.join(sorted(_REGISTRY))}"
        ) from None


def registered() -> dict[str, ModelSpec]:
    return dict(_REGISTRY)
