"""Fine-tuning train step: jtkd's jit step vs the same step in PyTorch (eager, channels_last, compile).

Both sides run the same network with the same weights (the torchvision model's initial state_dict
is converted with `converters.torchvision.convert`), the same batch, cross-entropy and SGD with
momentum 0.9, in train mode (BatchNorm batch statistics, dropout on). The first step's loss of each
contender is recorded as evidence that the same computation is being timed (equal where train mode is
deterministic; stochastic depth, as in swin_t, draws its own masks on each side).

jtkd: `jtkd.train.make_train_step(mesh, classification_loss())` over a one-device mesh, compiled
ahead of time so compilation is timed on its own and XLA's FLOP count of the step is available.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from bench.common import PRESETS, Preset, Runner, TrainCase, interleaved, short_error, timed

NUM_CLASSES = 10
LR = 0.01
MOMENTUM = 0.9


# --------------------------------------------------------------------------------------- builders
DTYPES = ("float32", "bfloat16")


def torch_device(device: str) -> str:
    return "cuda" if device == "gpu" else "cpu"


def torch_autocast(x: Any, dtype: str) -> Any:
    """torch's mixed precision for `--dtype`: autocast on x's device type (a no-op context for float32)."""
    import torch

    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def make_batch(size: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((batch, size, size, 3), dtype=np.float32),
        "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
    }


def available(name: str, size: int) -> str | None:
    """None if jtkd implements `name` at this input size, else why the case is skipped."""
    from jtkd import models

    if name not in models.list_models():
        return f"{name} is not in jtkd.models.list_models() on this branch (implemented on another branch)"
    spec = models.get_spec(name)
    if size < spec.min_size:
        return f"{name} needs inputs of at least {spec.min_size} px"
    return None


def torch_model(name: str, seed: int = 0, num_classes: int = NUM_CLASSES) -> Any:
    import torch
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def jax_variables_from_torch(name: str, module: Any) -> dict:
    from converters.torchvision import convert

    return convert(name, module.state_dict())


def jax_state(name: str, variables: dict, mesh: Any, **model_kw: Any) -> Any:
    import jax
    import optax

    from jtkd import models, train

    model = models.create(name, num_classes=NUM_CLASSES, axis_name=train.AXIS, **model_kw)
    variables = jax.tree.map(np.asarray, variables)
    return train.replicate(mesh, train.TrainState.create(model.apply, variables, optax.sgd(LR, momentum=MOMENTUM)))


def compile_jax_step(step: Callable, state: Any, batch: Any, extra: Any) -> tuple[Callable, float, float | None]:
    """AOT-compile a jtkd step; returns (compiled, seconds, XLA's FLOP count of one step)."""
    import jax

    compiled, seconds = timed(lambda: step.lower(state, batch, extra).compile())
    flops = None
    if jax.default_backend() != "cpu":  # cuDNN/cuBLAS custom calls are not in the count: ~2% of the work
        return compiled, seconds, None
    try:
        ca = compiled.cost_analysis()
        if isinstance(ca, (list, tuple)):  # older jax: one dict per computation
            ca = ca[0] if ca else {}
        flops = float(ca["flops"]) if ca and "flops" in ca else None
    except Exception:  # noqa: BLE001 - cost analysis is best effort on some backends
        flops = None
    return compiled, seconds, flops


def model_flops(name: str, size: int, batch: int) -> float | None:
    """Model FLOPs of one train step: 3x the forward pass (backward = 2x forward), the MFU convention.

    XLA's count of the compiled step is what XLA executes, which is not always what the model needs:
    XLA:CPU computes a depthwise convolution's weight gradient as a dense C x C convolution (C times
    the work), and work inside library custom calls (jtkd's oneDNN convolutions, cuDNN, cuBLAS) is not
    counted at all. The forward pass is therefore counted on the unoptimised HLO
    (`Lowered.cost_analysis`) of plain XLA convolutions (`layers.xla_operations`), lowered for the CPU on every
    machine: the GPU's cost analysis counts almost nothing of a program before compilation.
    """
    import jax
    import jax.numpy as jnp

    from jtkd import models
    from jtkd.models import layers

    try:
        with layers.xla_operations():  # no oneDNN custom calls, no rewritten convolutions
            module = models.create(name, num_classes=NUM_CLASSES)
            variables = models.shapes(module, size)
            x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
            fwd = jax.jit(lambda v, x: module.apply(v, x, train=False))
            ca = fwd.trace(variables, x).lower(lowering_platforms=("cpu",)).cost_analysis()
    except Exception:  # noqa: BLE001 - best effort: the MFU table then uses XLA's step count
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return 3.0 * float(ca["flops"]) if ca and "flops" in ca else None


def jax_runner(compiled: Callable, state: Any, batch: Any, extra: Any) -> tuple[Runner, Callable[[], float]]:
    """A runner over a donated state, and a function returning the last step's loss."""
    import jax

    holder: dict[str, Any] = {"state": state, "metrics": None}

    def run(n: int) -> None:
        s, m = holder["state"], holder["metrics"]
        for _ in range(n):
            s, m = compiled(s, batch, extra)
        jax.block_until_ready(s)
        holder["state"], holder["metrics"] = s, m

    return run, lambda: float(holder["metrics"]["loss"])


def torch_runner(step: Callable[[], Any], device: str) -> tuple[Runner, Callable[[], float]]:
    import torch

    holder: dict[str, Any] = {"loss": None}

    def run(n: int) -> None:
        loss = None
        for _ in range(n):
            loss = step()
        if device == "cuda":
            torch.cuda.synchronize()
        holder["loss"] = loss

    return run, lambda: float(holder["loss"])


def torch_classification_step(module: Any, x: Any, y: Any, dtype: str = "float32") -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM)

    def step() -> Any:
        opt.zero_grad(set_to_none=True)
        with torch_autocast(x, dtype):
            loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def torch_flops(step: Callable[[], Any]) -> float | None:
    """FLOPs of one torch step by torch's FlopCounterMode (matmuls and convolutions only)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        return float(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - a failing benchmark is recorded, not fatal
        return None


def torch_variants(module_factory: Callable[[], Any], batch: dict[str, np.ndarray], device: str, compile_: bool,
                   make_step: Callable[[Any, Any, Any], Callable[[], Any]]) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """The PyTorch contenders: eager NCHW (the default), eager channels_last, torch.compile.

    Returns ({name: step}, {name: why it is absent}).
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2))).to(device)
    y = torch.from_numpy(batch["label"].astype(np.int64)).to(device)
    steps: dict[str, Callable[[], Any]] = {}
    notes: dict[str, str] = {}
    steps["torch_eager"] = make_step(module_factory().to(device), x, y)
    cl = torch.channels_last
    steps["torch_channels_last"] = make_step(module_factory().to(device, memory_format=cl), x.contiguous(memory_format=cl), y)
    if compile_:
        steps["torch_compile"] = make_step(torch.compile(module_factory().to(device)), x, y)
    else:
        notes["torch_compile"] = "not timed for this case (see --compile)"
    return steps, notes


# -------------------------------------------------------------------------------------------- run
def run_case(case: TrainCase, preset: Preset, device: str, compile_: bool, progress: Any = None,
             dtype: str = "float32") -> dict[str, Any]:
    """One model/size/batch: every contender, interleaved."""
    import jax

    from jtkd import train

    out: dict[str, Any] = {"model": case.model, "size": case.size, "batch": case.batch, "contenders": {}, "notes": {}}
    why = available(case.model, case.size)
    if why:
        out["skipped"] = why
        return out
    tdev = torch_device(device)
    batch_np = make_batch(case.size, case.batch)
    reference = torch_model(case.model)
    variables = jax_variables_from_torch(case.model, reference)

    mesh = train.make_mesh(1)
    state = jax_state(case.model, variables, mesh, dtype=jax.numpy.dtype(dtype))
    batch = train.shard_batch(mesh, batch_np)
    step = train.make_train_step(mesh, train.classification_loss())
    compiled, compile_s, xla_flops = compile_jax_step(step, state, batch, None)
    out["jax_compile_s"] = compile_s
    out["xla_flops_per_step"] = xla_flops
    out["model_flops_per_step"] = model_flops(case.model, case.size, case.batch)

    def factory() -> Any:
        m = torch_model(case.model)
        m.load_state_dict(reference.state_dict())
        return m.train()

    tsteps, notes = torch_variants(factory, batch_np, tdev, compile_, partial(torch_classification_step, dtype=dtype))
    out["notes"].update(notes)
    runners: dict[str, Runner] = {}
    losses: dict[str, Callable[[], float]] = {}
    runners["jax"], losses["jax"] = jax_runner(compiled, state, batch, None)
    for name, s in tsteps.items():
        runners[name], losses[name] = torch_runner(s, tdev)

    first_step: dict[str, float] = {}
    first_loss: dict[str, float] = {}
    for name in list(runners):
        try:
            _, first_step[name] = timed(lambda r=runners[name]: r(1))
            first_loss[name] = losses[name]()
        except Exception as e:  # noqa: BLE001 - torch.compile without a working toolchain, for one
            out["notes"][name] = f"failed: {short_error(e)}"
            del runners[name]
    timings = interleaved(runners, warmup=preset.warmup, repeats=preset.repeats, steps=preset.steps, progress=progress)
    for name, t in timings.items():
        out["contenders"][name] = {**t.summary(case.batch), "first_step_s": first_step[name], "first_loss": first_loss[name]}
    out["torch_flops_per_step"] = torch_flops(tsteps["torch_eager"])
    jax.clear_caches()
    return out


def ratios(case: dict[str, Any]) -> dict[str, float]:
    """JAX images/s over each PyTorch contender's (>1: jtkd is faster)."""
    c = case.get("contenders", {})
    if "jax" not in c:
        return {}
    return {k: c["jax"]["items_per_s"] / v["items_per_s"] for k, v in c.items() if k != "jax"}


def run(preset: Preset, device: str, compile_mode: str, progress: Any = None,
        on_case: Callable[[list[dict[str, Any]]], None] | None = None, dtype: str = "float32") -> list[dict[str, Any]]:
    """Every train case of the preset; `on_case(results so far)` after each, so a caller can save
    them and a run cut short keeps its finished cases."""
    results: list[dict[str, Any]] = []
    for case in preset.train:
        compile_ = {"auto": case.compile, "all": True, "none": False}[compile_mode]
        try:
            res = run_case(case, preset, device, compile_, progress, dtype)
        except Exception as e:  # noqa: BLE001 - a failing benchmark is recorded, not fatal
            res = {"model": case.model, "size": case.size, "batch": case.batch, "error": short_error(e, 1000)}
        if progress is not None and not res.get("contenders"):
            progress.update(preset.repeats)  # keep the bar's total honest for skipped cases
        res["ratio"] = ratios(res)
        results.append(res)
        if on_case is not None:
            on_case(results)
    return results


__all__ = ["PRESETS", "available", "make_batch", "ratios", "run", "run_case"]
