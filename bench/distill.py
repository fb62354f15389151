"""Distillation step: frozen teacher forward (eval mode) + student train step, in one step.

Loss (Hinton et al. 2015), the same on both sides:
    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)
with T = 4, alpha = 0.9. jtkd: `make_train_step(mesh, loss_fn)` where the teacher's variables are
the step's replicated `extra` argument (a traced input, not a baked-in constant). If `jtkd.distill`
provides a step builder (branch `distill`), it is used instead; see `_jtkd_distill_loss`.
PyTorch: teacher in eval mode under no_grad, student in train mode, SGD momentum.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench import train_step as ts
from bench.common import Preset, Runner, interleaved, short_error, timed

TEMPERATURE = 4.0
ALPHA = 0.9


def hinton_loss_fn(teacher_apply: Any) -> Any:
    """A jtkd LossFn: `extra` holds the teacher's variables."""
    import jax
    import jax.numpy as jnp
    import optax

    from jtkd import train

    def loss_fn(params: Any, state: Any, batch: Any, rng: jax.Array, extra: Any):
        x = batch["image"]
        t_logits = jax.lax.stop_gradient(teacher_apply(extra, x, train=False))
        variables = {"params": params, "batch_stats": state.batch_stats}
        s_logits, mutated = state.apply_fn(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
        t_prob = jax.nn.softmax(t_logits / TEMPERATURE)
        kl = optax.kl_divergence(jax.nn.log_softmax(s_logits / TEMPERATURE), t_prob).mean()
        ce = train.cross_entropy(s_logits, batch["label"])
        loss = ALPHA * TEMPERATURE**2 * kl + (1 - ALPHA) * ce
        return loss, (mutated["batch_stats"], {"loss": loss, "kd": kl, "ce": ce, "accuracy": jnp.mean(s_logits.argmax(-1) == batch["label"])})

    return loss_fn


def _jtkd_distill_loss(teacher_apply: Any) -> tuple[Any, str]:
    """jtkd.distill's Hinton loss for make_train_step if that module offers one, else this file's."""
    try:
        from jtkd import distill  # noqa: F401  (branch `distill`)
    except ImportError:
        return hinton_loss_fn(teacher_apply), "bench/distill.py hinton_loss_fn (jtkd.distill not on this branch)"
    builder = getattr(distill, "hinton_loss_fn", None) or getattr(distill, "make_distill_loss", None)
    if builder is None:
        return hinton_loss_fn(teacher_apply), "bench/distill.py hinton_loss_fn (jtkd.distill has no loss builder it knows)"
    try:
        return builder(teacher_apply, temperature=TEMPERATURE, alpha=ALPHA), f"jtkd.distill.{builder.__name__}"
    except TypeError as e:
        return hinton_loss_fn(teacher_apply), f"bench/distill.py hinton_loss_fn (jtkd.distill.{builder.__name__} signature differs: {e})"


def torch_distill_step(teacher: Any, student: Any, x: Any, y: Any) -> Any:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(student.parameters(), lr=ts.LR, momentum=ts.MOMENTUM)
    teacher.eval()

    def step() -> Any:
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        kl = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, -1), F.softmax(t_logits / TEMPERATURE, -1), reduction="batchmean")
        loss = ALPHA * TEMPERATURE**2 * kl + (1 - ALPHA) * F.cross_entropy(s_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def run(preset: Preset, device: str, progress: Any = None) -> dict[str, Any]:
    import jax
    import torch

    from jtkd import models, train

    teacher_name, student_name, size, bs = preset.distill
    out: dict[str, Any] = {"teacher": teacher_name, "student": student_name, "size": size, "batch": bs, "contenders": {}, "notes": {}}
    for name in (teacher_name, student_name):
        why = ts.available(name, size)
        if why:
            out["skipped"] = why
            return out
    try:
        tdev = ts.torch_device(device)
        batch_np = ts.make_batch(size, bs)
        t_torch = ts.torch_model(teacher_name, seed=1).eval()
        s_torch = ts.torch_model(student_name, seed=2)

        mesh = train.make_mesh(1)
        teacher = models.create(teacher_name, num_classes=ts.NUM_CLASSES)
        t_vars = train.replicate(mesh, jax.tree.map(np.asarray, ts.jax_variables_from_torch(teacher_name, t_torch)))
        state = ts.jax_state(student_name, ts.jax_variables_from_torch(student_name, s_torch), mesh)
        loss_fn, out["jax_loss"] = _jtkd_distill_loss(teacher.apply)
        batch = train.shard_batch(mesh, batch_np)
        compiled, out["jax_compile_s"], out["xla_flops_per_step"] = ts.compile_jax_step(
            train.make_train_step(mesh, loss_fn), state, batch, t_vars
        )
        runners: dict[str, Runner] = {}
        losses = {}
        runners["jax"], losses["jax"] = ts.jax_runner(compiled, state, batch, t_vars)
        x = torch.from_numpy(np.ascontiguousarray(batch_np["image"].transpose(0, 3, 1, 2))).to(tdev)
        y = torch.from_numpy(batch_np["label"].astype(np.int64)).to(tdev)
        runners["torch_eager"], losses["torch_eager"] = ts.torch_runner(torch_distill_step(t_torch.to(tdev), s_torch.to(tdev).train(), x, y), tdev)
        first, first_loss = {}, {}
        for name in runners:
            _, first[name] = timed(lambda: runners[name](1))
            first_loss[name] = losses[name]()
        timings = interleaved(runners, warmup=preset.warmup, repeats=preset.repeats, steps=preset.steps, progress=progress)
        for name, t in timings.items():
            out["contenders"][name] = {**t.summary(bs), "first_step_s": first[name], "first_loss": first_loss[name]}
        out["ratio"] = {"torch_eager": out["contenders"]["jax"]["items_per_s"] / out["contenders"]["torch_eager"]["items_per_s"]}
        jax.clear_caches()
    except Exception as e:
        out["error"] = short_error(e, 1000)
    return out
