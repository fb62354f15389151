"""Distillation step: frozen teacher forward (eval mode) + student train step, in one step.

Loss (Hinton et al. 2015), the same on both sides:
    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)
with T = 4, alpha = 0.9 (jtkd.distill's "kd" defaults). jtkd: `jtkd.distill.distill_loss` in
`jtkd.train.make_train_step`, the teachers' variables being the step's replicated `extra` argument
(traced inputs, not baked-in constants). PyTorch: teacher in eval mode under no_grad, student in
train mode, SGD momentum.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench import train_step as ts
from bench.common import Preset, Runner, interleaved, short_error, timed

TEMPERATURE = 4.0
ALPHA = 0.9


def torch_distill_step(teacher: Any, student: Any, x: Any, y: Any, dtype: str = "float32") -> Any:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(student.parameters(), lr=ts.LR, momentum=ts.MOMENTUM)
    teacher.eval()

    def step() -> Any:
        with ts.torch_autocast(x, dtype):
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
        t_logits, s_logits = t_logits.float(), s_logits.float()  # the loss in float32, as jtkd's
        kl = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, -1), F.softmax(t_logits / TEMPERATURE, -1), reduction="batchmean")
        loss = ALPHA * TEMPERATURE**2 * kl + (1 - ALPHA) * F.cross_entropy(s_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def run(preset: Preset, device: str, progress: Any = None, dtype: str = "float32") -> dict[str, Any]:
    import jax
    import optax
    import torch

    from jtkd import distill as jd
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
        teacher = models.create(teacher_name, num_classes=ts.NUM_CLASSES, dtype=jax.numpy.dtype(dtype))
        t_vars_host = jax.tree.map(np.asarray, ts.jax_variables_from_torch(teacher_name, t_torch))
        objective = jd.make_objective(jd.DistillConfig(method="kd", ce_weight=1 - ALPHA, weights=(ALPHA,), temperature=TEMPERATURE))
        student = jd.build_student(
            models.create(student_name, num_classes=ts.NUM_CLASSES, axis_name=train.AXIS, dtype=jax.numpy.dtype(dtype)), objective,
            [teacher], [t_vars_host], size
        )
        s_vars = jax.tree.map(np.asarray, ts.jax_variables_from_torch(student_name, s_torch))
        tx = optax.sgd(ts.LR, momentum=ts.MOMENTUM)
        state = train.replicate(mesh, jd.create_state(student, s_vars, tx, size))
        extra = train.replicate(mesh, [t_vars_host])
        out["jax_loss"] = "jtkd.distill.distill_loss(make_objective(DistillConfig(method='kd')))"
        batch = train.shard_batch(mesh, batch_np)
        compiled, out["jax_compile_s"], out["xla_flops_per_step"] = ts.compile_jax_step(
            train.make_train_step(mesh, jd.distill_loss(objective, [teacher])), state, batch, extra
        )
        runners: dict[str, Runner] = {}
        losses = {}
        runners["jax"], losses["jax"] = ts.jax_runner(compiled, state, batch, extra)
        x = torch.from_numpy(np.ascontiguousarray(batch_np["image"].transpose(0, 3, 1, 2))).to(tdev)
        y = torch.from_numpy(batch_np["label"].astype(np.int64)).to(tdev)
        runners["torch_eager"], losses["torch_eager"] = ts.torch_runner(torch_distill_step(t_torch.to(tdev), s_torch.to(tdev).train(), x, y, dtype), tdev)
        first, first_loss = {}, {}
        for name, runner in runners.items():
            _, first[name] = timed(lambda r=runner: r(1))
            first_loss[name] = losses[name]()
        timings = interleaved(runners, warmup=preset.warmup, repeats=preset.repeats, steps=preset.steps, progress=progress)
        for name, t in timings.items():
            out["contenders"][name] = {**t.summary(bs), "first_step_s": first[name], "first_loss": first_loss[name]}
        out["ratio"] = {"torch_eager": out["contenders"]["jax"]["items_per_s"] / out["contenders"]["torch_eager"]["items_per_s"]}
        jax.clear_caches()
    except Exception as e:  # noqa: BLE001 - a failing benchmark is recorded, not fatal
        out["error"] = short_error(e, 1000)
    return out
