"""Numerical parity between a torchvision model and its jtkd conversion.

    python -m converters.parity resnet50 [--checkpoint PATH] [--size 97 131]

reports the max abs logit difference and, layer by layer, the max abs difference of every
intermediate activation (torch forward hooks vs Flax `capture_intermediates`), naming the first
layer that diverges.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from converters.torchvision import convert, flax_path, infer_num_classes, load_checkpoint, _fix_keys
from jtkd import models
from jtkd.models.registry import get_spec


def randomize_(model: Any, seed: int = 0) -> Any:
    """Perturb a torch model in place so parity cannot pass by accident: every BatchNorm gets random
    affine parameters and running statistics, and zero-initialised biases become random."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                if mod.affine:
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
                if mod.running_mean is not None:
                    mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                    mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) * 1.5 + 0.5)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and mod.bias is not None:
                mod.bias.add_(torch.randn(mod.bias.shape, generator=g) * 0.02)
            elif isinstance(mod, torch.nn.LayerNorm) and mod.elementwise_affine:
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g) * 0.1)
                mod.bias.add_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    return model


def torch_model(name: str, state_dict: dict | None = None, seed: int = 0, **kw: Any) -> Any:
    """A torchvision model in eval mode: the checkpoint's weights, or random ones (randomize_)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    if state_dict is not None:
        spec = get_spec(name)
        sd = _fix_keys(spec, state_dict)
        kw.setdefault("num_classes", infer_num_classes(spec, sd))
        if spec.infer_kwargs is not None:
            kw = {**spec.infer_kwargs({k: tuple(v.shape) for k, v in sd.items()}), **kw}
        model = torchvision.models.get_model(name, weights=None, **kw)
        model.load_state_dict(sd, strict=True)
    else:
        model = randomize_(torchvision.models.get_model(name, weights=None, **kw), seed)
    return model.eval()


def probe_batch(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A normalised NCHW float32 batch (standard normal, as ImageNet-normalised images roughly are)."""
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width), dtype=np.float32)


def torch_logits(model: Any, x_nchw: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(x_nchw))
    return (out.logits if hasattr(out, "logits") else out).numpy()


def flax_logits(name: str, variables: dict, x_nchw: np.ndarray, **kw: Any) -> np.ndarray:
    module = models.create(name, **kw)
    with jax.default_matmul_precision("highest"):
        fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
        return np.asarray(fn(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))))


@dataclasses.dataclass
class LayerDiff:
    layer: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_ref: float


def layer_diffs(name: str, model: Any, variables: dict, x_nchw: np.ndarray, num_classes: int) -> list[LayerDiff]:
    """Per-module max abs difference between torch activations (forward hooks) and Flax ones
    (`capture_intermediates`), matched by the mechanical key map, in torch execution order."""
    import torch

    acts: dict[str, np.ndarray] = {}
    order: list[str] = []

    def hook(mod_name: str):
        def fn(_m: Any, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and mod_name not in acts:
                acts[mod_name] = out.detach().clone().numpy()  # clone: inplace ReLUs follow
                order.append(mod_name)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(torch.from_numpy(x_nchw))
    finally:
        for h in handles:
            h.remove()
    module = models.create(name, num_classes=num_classes)
    with jax.default_matmul_precision("highest"):
        _, state = module.apply(
            variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), train=False, capture_intermediates=True,
            mutable=["intermediates"],
        )
    flat: dict[tuple[str, ...], Any] = {}

    def walk(d: Any, prefix: tuple[str, ...]) -> None:
        for k, v in d.items():
            if k == "__call__":
                flat[prefix] = v[0]
            elif isinstance(v, dict):
                walk(v, prefix + (k,))

    walk(state["intermediates"], ())
    out: list[LayerDiff] = []
    for mod_name in order:
        path = flax_path(mod_name + ".x")[:-1]
        if path not in flat:
            continue
        ref, got = acts[mod_name], np.asarray(flat[path])
        if ref.ndim == 4 and got.ndim == 4:
            got = got.transpose(0, 3, 1, 2)
        if ref.shape != got.shape:
            continue
        out.append(LayerDiff(mod_name, ref.shape, float(np.abs(ref - got).max()), float(np.abs(ref).max())))
    return out


def first_divergence(diffs: Sequence[LayerDiff], rtol: float = 1e-4) -> LayerDiff | None:
    for d in diffs:
        if d.max_abs_diff > rtol * max(1.0, d.max_abs_ref):
            return d
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="torchvision builder name, e.g. resnet50")
    ap.add_argument("--checkpoint", help="torch state_dict (.pth/.pt/.safetensors); random weights if omitted")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="probe image size (default: the model's)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--num-classes", type=int, default=17, help="classes for random weights")
    ap.add_argument("--json", action="store_true", help="print the per-layer table as JSON")
    args = ap.parse_args(argv)
    spec = get_spec(args.name)
    sd = load_checkpoint(args.checkpoint) if args.checkpoint else None
    model = torch_model(args.name, sd) if sd is not None else torch_model(args.name, num_classes=args.num_classes)
    sd = model.state_dict()
    variables = convert(args.name, sd)
    k = infer_num_classes(spec, sd)
    h, w = args.size or (spec.input_size, spec.input_size)
    x = probe_batch(args.batch, h, w)
    logit_diff = float(np.abs(torch_logits(model, x) - flax_logits(args.name, variables, x, num_classes=k)).max())
    diffs = layer_diffs(args.name, model, variables, x, k)
    first = first_divergence(diffs)
    if args.json:
        print(json.dumps({"logits_max_abs_diff": logit_diff, "layers": [dataclasses.asdict(d) for d in diffs],
                          "first_divergence": first.layer if first else None}, indent=1))
    else:
        print(f"{'layer':50s} {'shape':>22s} {'max|diff|':>11s} {'max|ref|':>10s}")
        for d in diffs:
            mark = "  <-- first divergence" if first is not None and d is first else ""
            print(f"{d.layer:50s} {str(d.shape):>22s} {d.max_abs_diff:11.3e} {d.max_abs_ref:10.3g}{mark}")
        print(f"logits max abs diff: {logit_diff:.3e}")
        print(f"first diverging layer: {first.layer if first else 'none (all within 1e-4 relative)'}")
    return 0 if first is None else 1


if __name__ == "__main__":
    sys.exit(main())
