"""Numerical parity between a torchvision model and its jtkd conversion.

    python -m converters.parity resnet50 [--checkpoint PATH] [--size 97 131]

reports the max abs logit difference and, layer by layer, the max abs difference of every
intermediate activation (torch forward hooks vs Flax `capture_intermediates`), naming the first
layer that diverges. With `--gradients` it also compares every parameter's gradient with torch's
autograd in float64 (`gradient_parity`), as fine-tuning will use them.
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

from converters.torchvision import (
    _fix_keys,
    build_torch_model,
    convert,
    flax_module,
    flax_path,
    infer_num_classes,
    load_checkpoint,
    model_kwargs,
)
from jtkd import models
from jtkd.models.registry import get_spec


def randomize_(model: Any, seed: int = 0, calibrate: np.ndarray | None = None) -> Any:
    """Perturb a torch model in place so parity cannot pass by accident: every BatchNorm gets random
    affine parameters and random running statistics, zero-initialised biases become random, and
    parameters initialised to zero or near zero (ViT's head, ConvNeXt's layer_scale) get N(0, 0.02).

    With a `calibrate` batch (NCHW), the running statistics are first set to the batch statistics of
    that input (one train-mode pass with momentum 1) and then perturbed (mean shifted by 0.1 std,
    variance scaled by U(0.5, 2)): activations stay O(1) through deep networks, so an absolute logit
    tolerance means the same for every model, and the statistics are still far from their defaults.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.affine:
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and mod.bias is not None:
                mod.bias.add_(torch.randn(mod.bias.shape, generator=g) * 0.02)
            elif isinstance(mod, torch.nn.LayerNorm) and mod.elementwise_affine:
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g) * 0.1)
                mod.bias.add_(torch.randn(mod.bias.shape, generator=g) * 0.1)
        for p in model.parameters():
            if p.abs().max() < 1e-4:  # zero/tiny inits (ViT head and class token, ConvNeXt layer_scale) would hide layers
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        tracked = [m for m in bns if m.running_mean is not None]
        if calibrate is not None and tracked:
            momenta = [m.momentum for m in tracked]
            was_training = model.training
            for m in tracked:
                m.momentum = 1.0
            model.eval()  # only the BatchNorms collect statistics: no dropout, no train-only branches (aux heads)
            for m in tracked:
                m.train()
            model(torch.from_numpy(calibrate))
            model.train(was_training)
            for m, mom in zip(tracked, momenta):
                m.momentum = mom
        for m in tracked:
            std = m.running_var.sqrt() if calibrate is not None else torch.ones_like(m.running_var)
            base_mean = m.running_mean if calibrate is not None else torch.zeros_like(m.running_mean)
            base_var = m.running_var if calibrate is not None else torch.ones_like(m.running_var)
            m.running_mean.copy_(base_mean + 0.1 * std * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(base_var * (torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5))
    return model


def torch_model(name: str, state_dict: dict | None = None, seed: int = 0, calibrate: bool = True, **kw: Any) -> Any:
    """A torchvision model in eval mode: the checkpoint's weights, or random ones (randomize_; without
    `calibrate`, random BatchNorm statistics around 0 and 1, enough where no forward pass follows)."""
    import torch

    torch.manual_seed(seed)
    if state_dict is not None:
        sd = _fix_keys(get_spec(name), state_dict)
        model = build_torch_model(name, **{**model_kwargs(name, state_dict), **kw})
        if not hasattr(sd, "_metadata"):  # a bare dict: the module versions of the model it was built as
            sd._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
        model.load_state_dict(sd, strict=True)
    else:
        calib = probe_batch(4, *get_spec(name).test_size, seed=seed + 1000) if calibrate else None
        model = randomize_(build_torch_model(name, **kw), seed, calibrate=calib)
    return model.eval()


def probe_batch(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A normalised NCHW float32 batch (standard normal, as ImageNet-normalised images roughly are)."""
    return np.random.default_rng(seed).standard_normal((batch, 3, height, width), dtype=np.float32)


def torch_logits(model: Any, x_nchw: np.ndarray) -> np.ndarray:
    return torch_forward(model, x_nchw, ())[0]


def torch_module_outputs(model: Any, x_nchw: np.ndarray, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Outputs of the torch submodules at dotted paths `names` (all that return a tensor if None),
    for one eval forward pass, in execution order (a module's first call)."""
    return torch_forward(model, x_nchw, names)[1]


def torch_forward(model: Any, x_nchw: np.ndarray, names: Sequence[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and the submodule outputs of `torch_module_outputs`, from one eval forward pass."""
    import torch

    acts: dict[str, np.ndarray] = {}

    def hook(name: str):
        def fn(_m: Any, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and name not in acts:
                acts[name] = out.detach().clone().numpy()  # clone: in-place ops follow some modules

        return fn

    mods = [(n, model.get_submodule(n)) for n in names] if names is not None else [(n, m) for n, m in model.named_modules() if n]
    handles = [m.register_forward_hook(hook(n)) for n, m in mods]
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(x_nchw))
    finally:
        for h in handles:
            h.remove()
    return (out.logits if hasattr(out, "logits") else out).numpy(), acts


def feature_rtol(logit_atol: float) -> float:
    """Tolerance of a named feature's max abs diff relative to max(1, its max |activation|).

    Looser than the logits': rounding accumulates along deep stacks and the pooled classifier averages
    it out (resnet50/101/152 layer4: 2.8e-5/8e-5/2.6e-4, their logits 8e-6/4e-5/6e-5); a wrong
    operation gives O(1)."""
    return max(1e-3, logit_atol)


def forward_diffs(name: str, model: Any, variables: dict, x_nchw: np.ndarray, **kw: Any
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[float, float]]]:
    """Torch logits, Flax logits and, for every named Flax feature but 'pooled' (no module's output in
    every family), (max abs diff, max abs torch value) against the output of the torch module of that
    path: one eval forward pass on each side."""
    module = flax_module(name, variables, **kw)
    with jax.default_matmul_precision("highest"):
        logits, feats = jax.jit(lambda v, x: models.features(module, v, x))(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
    names = [k for k in feats if k != "pooled"]
    ref_logits, ref = torch_forward(model, x_nchw, names)
    out = {}
    for k in names:
        got, want = np.asarray(feats[k]), ref[k]
        if got.ndim == 4 and got.shape != want.shape:  # NHWC here, NCHW in torch (Swin keeps NHWC)
            got = got.transpose(0, 3, 1, 2)
        if got.shape != want.shape:
            raise AssertionError(f"{name}: feature {k!r} has shape {got.shape}, torch module output {want.shape}")
        out[k] = (float(np.abs(got - want).max()), float(np.abs(want).max()))
    return ref_logits, np.asarray(logits), out


def flax_logits(name: str, variables: dict, x_nchw: np.ndarray, **kw: Any) -> np.ndarray:
    module = flax_module(name, variables, **kw)
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
    acts = torch_module_outputs(model, x_nchw)
    module = flax_module(name, variables, num_classes=num_classes)
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
    for mod_name in acts:
        path = flax_path(mod_name + ".x")[:-1]
        if path not in flat or not hasattr(flat[path], "shape"):  # ViT's heads return (pooled, logits) here
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


# The kinks of the piecewise-linear activations torchvision's models call (hardtanh: its min_val and max_val).
_KINKS = {"relu": (0.0,), "relu_": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0), "hardsigmoid": (-3.0, 3.0)}


def _kink_recorder() -> Any:
    """A torch function mode recording, for every activation call with a kink, how close its input comes to
    one relative to the input's RMS: (margin, op) in `.margins`."""
    import torch
    from torch.overrides import TorchFunctionMode

    class KinkMargin(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.margins: list[tuple[float, str]] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            op = getattr(func, "__name__", "")
            if (op in _KINKS or op == "hardtanh") and isinstance(args[0], torch.Tensor):
                x = args[0].detach()
                kinks = _KINKS.get(op) or (kwargs.get("min_val", args[1] if len(args) > 1 else -1.0),
                                           kwargs.get("max_val", args[2] if len(args) > 2 else 1.0))
                rms = float(x.double().pow(2).mean().sqrt()) or 1.0
                self.margins.append((min(float((x - k).abs().min()) for k in kinks) / rms, op))
            return func(*args, **kwargs)

    return KinkMargin()


# Gradient differences beyond this fraction of the model's largest gradient are errors (jtkd's float32 gradients
# are ~1e-6 of it from torch's float64 ones for one model of every family: tests/test_gradients.py).
GRADIENT_ATOL = 2e-5


# An activation input closer to a kink than this fraction of its tensor's RMS can land on either side in
# float32 (googlenet: 1e-7, resnet18 at another probe: 1e-6; bench/FINDINGS.md, fifteenth session).
KINK_ROUNDING = 1e-5


def _float64_forward(model: Any, x_nchw: np.ndarray) -> tuple[Any, Any, tuple[float, str]]:
    """The eval forward of a float64 copy of the torch `model` (which is not changed): the copy, its logits,
    and the smallest (kink margin, activation) of the pass ((inf, 'none') without kinks)."""
    import copy

    import torch

    ref = copy.deepcopy(model).double().eval()
    kinks = _kink_recorder()
    with kinks:
        out = ref(torch.from_numpy(x_nchw).double())
    return ref, (out.logits if hasattr(out, "logits") else out), min(kinks.margins, default=(float("inf"), "none"))


def kink_margin(model: Any, x_nchw: np.ndarray) -> tuple[float, str]:
    """The smallest distance of any activation input to a kink, relative to that input's RMS, in the float64
    eval forward of a copy of the torch `model` on `x_nchw`, and the activation's name ((inf, 'none') without
    kinks): how well a probe conditions a float32 gradient comparison."""
    import torch

    with torch.no_grad():
        return _float64_forward(model, x_nchw)[2]


@dataclasses.dataclass
class GradientParity:
    """jtkd's float32 parameter gradients and torch's float64 ones (Flax paths, Flax layout), and how close the
    probe came to an activation kink: within float32 rounding of one (`KINK_ROUNDING`) a unit's gradient may
    flow on one side and not the other, and neither side is wrong."""

    got: dict[str, np.ndarray]
    want: dict[str, np.ndarray]
    kink_margin: float
    kink_op: str

    @property
    def scale(self) -> float:
        """The largest reference gradient: differences are measured against it."""
        return max(float(np.abs(v).max()) for v in self.want.values())

    def worst(self) -> tuple[str, float]:
        """The parameter with the largest max abs difference, and that difference."""
        return max(((k, float(np.abs(self.got[k] - w).max())) for k, w in self.want.items()), key=lambda t: t[1])


def gradient_parity(name: str, model: Any, variables: dict, x_nchw: np.ndarray, num_classes: int,
                    loss_weights: np.ndarray | None = None) -> GradientParity:
    """Every parameter's gradient of sum(logits * loss_weights) in eval mode (loss_weights standard normal by
    default): torch's autograd in float64 (the reference: torch's own float32 gradients can be the less
    accurate side) against jtkd's jit-compiled float32 gradient with `variables`. `model` is not changed."""
    import torch

    if loss_weights is None:
        loss_weights = np.random.default_rng(0).standard_normal((x_nchw.shape[0], num_classes)).astype(np.float32)
    ref, out, (margin, op) = _float64_forward(model, x_nchw)
    (out * torch.from_numpy(loss_weights).double()).sum().backward()
    # the gradients in the state_dict's layout (buffers as they are), converted as the weights are
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).float() for k, p in ref.named_parameters()}
    want = convert(name, {k: grads.get(k, v.float()) for k, v in ref.state_dict().items()})["params"]

    module = flax_module(name, variables, num_classes=num_classes)

    def loss(params: Any, x: jax.Array) -> jax.Array:
        return jnp.sum(module.apply({**variables, "params": params}, x, train=False) * loss_weights)

    with jax.default_matmul_precision("highest"):
        got = jax.jit(jax.grad(loss))(variables["params"], jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
    return GradientParity(_by_path(got), _by_path(want), margin, op)


def _by_path(tree: Any) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def parity_row(name: str, num_classes: int = 13, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """One PARITY.md row: random weights + randomised BN stats, the spec's test size, fp32 highest."""
    import time

    spec = get_spec(name)
    model = torch_model(name, num_classes=num_classes, seed=seed)
    x = probe_batch(batch, *spec.test_size, seed=seed + 1)
    t0 = time.perf_counter()
    variables = convert(name, model.state_dict())
    seconds = time.perf_counter() - t0
    # one forward pass per side gives logits and features: a second pass would double the suite's
    # longest tests and check nothing new (sow does not change the computation)
    ref, got, feats = forward_diffs(name, model, variables, x, num_classes=num_classes)
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: Flax logits {got.shape} vs torch {ref.shape}")
    diff = float(np.abs(ref - got).max())
    row = {
        "model": name, "family": spec.family, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "input": f"{batch}x{spec.test_size[0]}x{spec.test_size[1]}", "max_abs_logit_diff": diff,
        "max_abs_logit": float(np.abs(ref).max()), "atol": spec.atol, "argmax_equal": bool((ref.argmax(-1) == got.argmax(-1)).all()),
        "convert_s": seconds, "first_divergence": None,
    }
    # relative to the activations' scale: unnormalised stage outputs reach 1e2-1e3
    worst = max(feats, key=lambda k: feats[k][0] / max(1.0, feats[k][1]), default=None)
    row["features"] = len(feats)
    row["max_rel_feature_diff"] = feats[worst][0] / max(1.0, feats[worst][1]) if worst else 0.0
    row["worst_feature"] = worst
    if diff > spec.atol:
        first = first_divergence(layer_diffs(name, model, variables, x, num_classes))
        row["first_divergence"] = first.layer if first else "(logits only)"
    return row


def environment() -> str:
    """Where parity is measured: JAX's device and the versions (torch's reference runs on the CPU)."""
    import platform

    import torch
    import torchvision

    dev = jax.devices()[0]
    where = f"{platform.machine()} CPU" if dev.platform == "cpu" else f"JAX on {dev.device_kind} ({dev.platform})"
    return (f"jax {jax.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}; {where}, "
            "torch's reference on the CPU")


def write_markdown(rows: Sequence[dict[str, Any]], path: str, missing: Sequence[str] = (),
                   generated_by: str = "python -m converters.parity --all --markdown converters/PARITY.md",
                   where: str | None = None) -> None:
    """`where`: the environment the rows were measured in (default: this process's, `environment()`)."""
    ok = sum(r["max_abs_logit_diff"] <= r["atol"] and r["argmax_equal"]
             and r.get("max_rel_feature_diff", 0.0) <= feature_rtol(r["atol"]) for r in rows)
    lines = [
        "# PARITY: jtkd vs torchvision",
        "",
        f"Generated by `{generated_by}`. Each model: torchvision",
        "random init with randomised BatchNorm affine parameters and running statistics",
        "(`converters.parity.randomize_`), 13 classes, a batch of 2 standard-normal images at the size",
        "shown (odd and non-224 where the architecture allows), eval mode, fp32 with",
        "`jax.default_matmul_precision('highest')`.",
        "",
        f"{ok}/{len(rows)} within tolerance. {where or environment()}.",
        "",
        "Named features: every intermediate output `jtkd.models.features` returns (torchvision module",
        "paths) against the output of the torch module of that path; the worst difference relative to",
        "max(1, max |activation|), tolerance `feature_rtol` (1e-3: rounding accumulates along deep stacks).",
        "",
        "| model | family | params (M) | input NxHxW | max abs logit diff | max abs logit | tolerance | argmax equal | named features | worst feature rel. diff | convert (s) | first diverging layer |",
        "|---|---|---:|---|---:|---:|---:|:---:|---:|---|---:|---|",
    ]
    for r in rows:
        feat = f"{r['max_rel_feature_diff']:.1e} ({r['worst_feature']})" if r.get("worst_feature") else "-"
        lines.append(
            f"| {r['model']} | {r['family']} | {r['params_m']:.1f} | {r['input']} | {r['max_abs_logit_diff']:.2e} | "
            f"{r['max_abs_logit']:.3g} | {r['atol']:.0e} | {'yes' if r['argmax_equal'] else 'NO'} | {r.get('features', '-')} | "
            f"{feat} | {r['convert_s']:.2f} | {r['first_divergence'] or '-'} |"
        )
    if missing:
        lines += ["", f"Not measured in this generation ({len(missing)}): {', '.join(missing)} "
                  "(`JTKD_PARITY_JSONL=rows.jsonl python -m pytest tests/test_parity.py` or `--all` runs them)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", help="torchvision builder name, e.g. resnet50")
    ap.add_argument("--all", action="store_true", help="every registered model, one row each")
    ap.add_argument("--markdown", metavar="PATH", help="with --all: write the table here (PARITY.md)")
    ap.add_argument("--from-jsonl", metavar="PATH", help="write --markdown from rows the parity tests recorded "
                    "(JTKD_PARITY_JSONL=PATH pytest tests/test_parity.py)")
    ap.add_argument("--where", help="with --from-jsonl: where the rows were measured (default: this machine)")
    ap.add_argument("--checkpoint", help="torch state_dict (.pth/.pt/.safetensors); random weights if omitted")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="probe image size (default: the model's)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the probe batch (standard normal images)")
    ap.add_argument("--num-classes", type=int, default=17, help="classes for random weights")
    ap.add_argument("--json", action="store_true", help="print the per-layer table as JSON")
    ap.add_argument("--gradients", action="store_true", help="also compare every parameter's gradient with "
                    "torch's autograd in float64 (eval mode); fails beyond GRADIENT_ATOL of the largest gradient")
    args = ap.parse_args(argv)
    if args.from_jsonl:
        rows = {}
        for line in open(args.from_jsonl):
            r = json.loads(line)
            rows[r["model"]] = r
        missing = [n for n in models.list_models() if n not in rows]
        out = args.markdown or "PARITY.md"
        write_markdown([rows[n] for n in sorted(rows)], out, missing,
                       generated_by=f"python -m converters.parity --from-jsonl ROWS.jsonl --markdown {out}", where=args.where)
        return 0
    if args.all:
        from tqdm import tqdm

        rows = []
        for name in (bar := tqdm(models.list_models(), desc="parity")):
            bar.set_postfix_str(name)
            rows.append(parity_row(name))
            tqdm.write(f"{name:24s} max|diff| {rows[-1]['max_abs_logit_diff']:.2e}")
        if args.markdown:
            write_markdown(rows, args.markdown)
        return 0 if all(r["max_abs_logit_diff"] <= r["atol"] and r["argmax_equal"] for r in rows) else 1
    if not args.name:
        ap.error("NAME or --all is required")
    spec = get_spec(args.name)
    sd = load_checkpoint(args.checkpoint) if args.checkpoint else None
    model = torch_model(args.name, sd) if sd is not None else torch_model(args.name, num_classes=args.num_classes)
    sd = model.state_dict()
    variables = convert(args.name, sd)
    k = infer_num_classes(spec, sd)
    h, w = args.size or (models.input_size(args.name, model_kwargs(args.name, sd)),) * 2
    x = probe_batch(args.batch, h, w, seed=args.seed)
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
    if not args.gradients:
        return 0 if first is None else 1
    grads = gradient_parity(args.name, model, variables, x, k)
    worst, diff = grads.worst()
    report = {"gradient_max_abs_diff": diff, "worst_parameter": worst, "largest_gradient": grads.scale,
              "tolerance": GRADIENT_ATOL * grads.scale, "kink_margin": grads.kink_margin, "kink_op": grads.kink_op}
    ok = diff <= GRADIENT_ATOL * grads.scale
    print(json.dumps(report, indent=1) if args.json else
          f"gradients: max abs diff {diff:.3e} ({worst}) of a largest gradient {grads.scale:.3g} (tolerance "
          f"{GRADIENT_ATOL:.0e} of it); closest activation input to a kink ({grads.kink_op}): {grads.kink_margin:.1e} "
          "of its RMS" + ("" if ok or grads.kink_margin >= KINK_ROUNDING else
                          ": within float32 rounding, where either side of the kink is right; try another --seed"))
    return 0 if first is None and ok else 1


if __name__ == "__main__":
    sys.exit(main())
