"""MNASNet 0.5/0.75/1.0/1.3 (B1 variant), as `torchvision.models.mnasnet`.

torch's `layers` is a flat Sequential: its convs/BatchNorms are the top-level modules `layers_<i>`
and its stacks of inverted residuals (`layers.8` ... `layers.13`, each a Sequential) the blocks
`layers_<i>_<j>`, whose own `layers` Sequential gives `layers_0` ... `layers_7` inside.
BatchNorm momentum is torchvision's `1 - 0.9997` (torch convention: weight of the new statistics).

Version-1 checkpoints (saved before torchvision 0.5, `_version` 1 in the state_dict metadata) of the
non-1.0 widths have a stem that is not width-scaled (32 and 16 channels). The keys are the same, only
the shapes differ, so this is not a key fixup: `legacy_stem=True` builds that stem, and `convert`
infers it from the checkpoint's `layers.0.weight` shape.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from jtkd.models import layers
from jtkd.models.registry import register

_BN = {"momentum": 1 - 0.9997}  # torchvision's _BN_MOMENTUM, already in torch's convention
_linear_init = nn.initializers.variance_scaling(1.0, "fan_out", "uniform")  # kaiming_uniform_(fan_out, sigmoid)


def _round_to_multiple_of(val: float, divisor: int, round_up_bias: float = 0.9) -> int:
    """torchvision's asymmetric rounding: (83, 8) -> 80 but (84, 8) -> 88."""
    new_val = max(divisor, int(val + divisor / 2) // divisor * divisor)
    return new_val if new_val >= round_up_bias * val else new_val + divisor


def get_depths(alpha: float) -> list[int]:
    return [_round_to_multiple_of(d * alpha, 8) for d in (32, 16, 24, 40, 80, 96, 192, 320)]


class _InvertedResidual(layers.TorchModel):
    out_ch: int = 16
    kernel_size: int = 3
    stride: int = 1
    expansion_factor: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        in_ch = x.shape[-1]
        mid = in_ch * self.expansion_factor
        k = self.kernel_size
        y = nn.relu(self.norm(name="layers_1", **_BN)(self.conv(mid, 1, bias=False, name="layers_0")(x), train))
        y = self.conv(mid, k, self.stride, k // 2, groups=mid, bias=False, name="layers_3")(y)
        y = nn.relu(self.norm(name="layers_4", **_BN)(y, train))
        y = self.norm(name="layers_7", **_BN)(self.conv(self.out_ch, 1, bias=False, name="layers_6")(y), train)
        return y + x if in_ch == self.out_ch and self.stride == 1 else y


# stacks at torch indices 8..13: (index into depths of the output width, kernel, stride, expansion, repeats)
_STACKS = ((2, 3, 2, 3, 3), (3, 5, 2, 3, 3), (4, 5, 2, 6, 3), (5, 3, 1, 6, 2), (6, 5, 2, 6, 4), (7, 3, 1, 6, 1))


class MNASNet(layers.TorchModel):
    alpha: float = 1.0
    dropout: float = 0.2
    legacy_stem: bool = False  # version-1 checkpoint layout: stem of 32/16 channels whatever alpha

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.alpha <= 0.0:
            raise ValueError(f"alpha should be greater than 0.0 instead of {self.alpha}")
        x = x.astype(self.dtype)
        depths = get_depths(self.alpha)
        stem = (32, 16) if self.legacy_stem else (depths[0], depths[1])
        x = self.conv(stem[0], 3, 2, 1, bias=False, name="layers_0")(x)
        x = nn.relu(self.norm(name="layers_1", **_BN)(x, train))
        x = self.conv(stem[0], 3, 1, 1, groups=stem[0], bias=False, name="layers_3")(x)
        x = nn.relu(self.norm(name="layers_4", **_BN)(x, train))
        x = self.conv(stem[1], 1, bias=False, name="layers_6")(x)
        x = self.norm(name="layers_7", **_BN)(x, train)
        for i, (d, k, s, e, n) in enumerate(_STACKS, start=8):
            for j in range(n):
                x = _InvertedResidual(
                    out_ch=depths[d], kernel_size=k, stride=s if j == 0 else 1, expansion_factor=e, dtype=self.dtype,
                    axis_name=self.axis_name, name=f"layers_{i}_{j}",
                )(x, train)
            self.feature(f"layers.{i}", x)
        x = self.conv(1280, 1, bias=False, name="layers_14")(x)
        x = nn.relu(self.norm(name="layers_15", **_BN)(x, train))
        self.feature("layers.16", x)
        x = self.feature("pooled", x.mean(axis=(1, 2)))
        if self.num_classes:
            x = layers.dropout(self, x, self.dropout, train)
            x = self.linear(self.num_classes, kernel_init=_linear_init, name="classifier_1")(x)
        return self.logits(x)


def _infer_legacy_stem(alpha: float):
    """state_dict shapes -> {'legacy_stem': True} for a version-1 checkpoint of a non-1.0 width."""

    def infer(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, bool]:
        stem = shapes.get("layers.0.weight")
        if stem is not None and stem[0] == 32 and get_depths(alpha)[0] != 32:
            return {"legacy_stem": True}
        return {}

    return infer


def _torch_mnasnet(name: str, legacy_stem: bool = False, **kw: Any) -> Any:
    """torchvision's MNASNet; legacy_stem runs torchvision's own version-1 load hook, which swaps in
    the 32/16-channel stem and records version 1 in the state_dict metadata (so torch reloads it)."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None, **kw)
    if legacy_stem:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's "previous version" notice
            model._load_from_state_dict({}, "", {"version": 1}, False, [], [], [])
    return model


for _name, _alpha in (("mnasnet0_5", 0.5), ("mnasnet0_75", 0.75), ("mnasnet1_0", 1.0), ("mnasnet1_3", 1.3)):
    register(
        _name,
        MNASNet,
        head="classifier.1",
        kwargs=dict(alpha=_alpha),
        infer_kwargs=_infer_legacy_stem(_alpha),
        torch_builder=_torch_mnasnet,
        min_size=1,
    )
