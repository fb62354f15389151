"""Multi-task learning: one shared backbone, several named classification heads, weighted losses.

    tasks = (("species", 37), ("pose", 4))
    variables = multitask_variables("resnet50", torch_state_dict, tasks, rng=key)
    model = multitask_model("resnet50", tasks, variables, axis_name="data")  # backbone: pooled features
    loss_fn = multitask_loss({"species": 1.0, "pose": 0.5})
    trainer = Trainer(mesh, loss_fn, multitask_eval(model.task_names), config=...)

Batches carry one label array per task, 'label/<task>' (int32); a label < 0 marks an example
without a label for that task (partially labelled data), which then contributes nothing to that
task's loss or metrics. Parameters: {'backbone': ..., 'head_<task>': {'kernel', 'bias'}}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtkd import models, train
from jtkd.models import layers


class MultiTaskModel(nn.Module):
    """`backbone` (a jtkd model with num_classes=0) -> {task: logits} through one Linear head per task."""

    backbone: nn.Module
    tasks: tuple[tuple[str, int], ...]  # ((name, num_classes), ...)
    dtype: Any = jnp.float32

    def setup(self) -> None:
        names = [t for t, _ in self.tasks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"tasks need distinct names, got {names}")
        bad = [t for t, n in self.tasks if n < 1]
        if bad:
            raise ValueError(f"tasks {bad} need num_classes >= 1")
        if getattr(self.backbone, "num_classes", 0) != 0:
            raise ValueError("the backbone must be created with num_classes=0 (it must return pooled features)")
        self.heads = {t: layers.Linear(n, dtype=self.dtype, name=f"head_{t}") for t, n in self.tasks}

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.tasks)

    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        feats = self.backbone(x, train=train)
        return {t: self.heads[t](feats).astype(jnp.float32) for t, _ in self.tasks}


def multitask_variables(
    model: str,
    state_dict: Mapping[str, Any] | None,
    tasks: Sequence[tuple[str, int]],
    *,
    rng: jax.Array,
    head_init: str = "seeded",
    image_size: int | None = None,
) -> dict[str, Any]:
    """Variables for `multitask_model(model, tasks, variables)`: the backbone from a torch state_dict
    (its classifier and auxiliary classifiers dropped, a ViT's positional embeddings resampled for
    `image_size`; None: random init), heads initialised ('seeded' | 'zero')."""
    from converters.torchvision import convert, implied_kwargs
    from jtkd.finetune import split_head

    if head_init not in ("seeded", "zero"):
        raise ValueError(f"head_init must be 'seeded' or 'zero', got {head_init!r}")
    size = image_size or models.get_spec(model).input_size
    no_aux = {"aux_logits": False} if models.has_aux(model) else {}  # heads read one pooled output
    backbone_kw, converted = {**models.size_kwargs(model, size), **no_aux}, None
    if state_dict is not None:
        # num_classes=1 then drop the head: the backbone leaves are the model's minus its classifier
        converted, _ = split_head(model, convert(model, state_dict, head="reinit", num_classes=1, rng=rng))
        converted = models.at_size(model, converted, size)
        backbone_kw = implied_kwargs(model, converted)  # e.g. MNASNet's version-1 stem
    module = MultiTaskModel(models.create(model, num_classes=0, **backbone_kw), tuple(tasks))

    x = jnp.zeros((1, size, size, 3), jnp.float32)

    def init(key: jax.Array) -> dict[str, Any]:
        v = module.init(key, x, train=False)
        # with a converted backbone only the heads are kept, and XLA prunes the rest of the init
        return v if converted is None else {c: {k: a for k, a in t.items() if k != "backbone"} for c, t in v.items()}

    fresh = jax.jit(init)(rng)
    params = dict(fresh["params"])
    batch_stats = dict(fresh.get("batch_stats", {}))
    if converted is not None:
        want = jax.eval_shape(lambda key: module.init(key, x, train=False), rng)["params"]["backbone"]
        if jax.tree.structure(converted["params"]) != jax.tree.structure(want):
            raise ValueError(f"{model}: converted backbone does not match the num_classes=0 model")
        params["backbone"] = converted["params"]
        batch_stats["backbone"] = converted["batch_stats"]
    if head_init == "zero":
        for t, _ in tasks:
            params[f"head_{t}"] = jax.tree.map(jnp.zeros_like, params[f"head_{t}"])
    return {"params": params, "batch_stats": batch_stats}


def multitask_model(
    model: str, tasks: Sequence[tuple[str, int]], variables: Mapping[str, Any], **kw: Any
) -> MultiTaskModel:
    """The MultiTaskModel that applies `variables` (from `multitask_variables`): its backbone built with
    the arguments their shapes imply (a ViT's image_size, ...); `kw` go to the backbone (axis_name, dtype)."""
    from converters.torchvision import flax_module

    backbone = flax_module(model, {"params": variables["params"]["backbone"]}, num_classes=0, **kw)
    return MultiTaskModel(backbone, tuple(tasks))


def _task_ce(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-example CE, per-example correct, valid mask) with labels < 0 masked out."""
    valid = (labels >= 0).astype(jnp.float32)
    safe = jnp.where(labels >= 0, labels, 0)
    q = optax.smooth_labels(jax.nn.one_hot(safe, logits.shape[-1]), label_smoothing)
    ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), q)
    correct = (logits.argmax(-1) == safe).astype(jnp.float32)
    return ce * valid, correct * valid, valid


def multitask_loss(weights: Mapping[str, float], label_smoothing: float = 0.0, train_mode: bool = True) -> train.LossFn:
    """L = sum_t w_t * mean_{i: y_i^t >= 0} CE(logits_t(x_i), y_i^t)  (per-device mean, as train.LossFn).

    A task with no labelled example on a device contributes 0 there. Metrics: 'loss' (the weighted
    total), 'loss/<task>', 'accuracy/<task>'.
    """
    weights = dict(weights)
    if not weights:
        raise ValueError("weights must name at least one task")

    def loss_fn(params, state, batch, rng, extra):
        outputs, batch_stats = train.forward(state, params, batch["image"], rng, train_mode)
        missing = [t for t in weights if t not in outputs]
        if missing:
            raise KeyError(f"loss weights name tasks {missing} the model does not have ({sorted(outputs)})")
        total = jnp.zeros((), jnp.float32)
        metrics: dict[str, jax.Array] = {}
        for t, w in weights.items():
            key = f"label/{t}"
            if key not in batch:
                raise KeyError(f"batch has no {key!r} (keys: {sorted(batch)})")
            ce, correct, valid = _task_ce(outputs[t], batch[key], label_smoothing)
            n = jnp.maximum(valid.sum(), 1.0)
            task_loss = ce.sum() / n
            total = total + w * task_loss
            metrics[f"loss/{t}"] = task_loss
            metrics[f"accuracy/{t}"] = correct.sum() / n
        metrics["loss"] = total
        return total, (batch_stats, metrics)

    return loss_fn


def multitask_eval(tasks: Sequence[str]):
    """Per-device sums for `Trainer.evaluate` (-> eval/loss/<t>, eval/accuracy/<t>): over labelled, unpadded rows."""
    tasks = tuple(tasks)

    def metrics_fn(state, batch, extra):
        outputs = state.apply_fn(state.variables, batch["image"], train=False)
        pad = batch["mask"].astype(jnp.float32) if "mask" in batch else 1.0
        out: dict[str, jax.Array] = {}
        for t in tasks:
            ce, correct, valid = _task_ce(outputs[t], batch[f"label/{t}"], 0.0)
            out[f"loss/{t}"] = (ce * pad).sum()
            out[f"accuracy/{t}"] = (correct * pad).sum()
            out[f"count/{t}"] = (valid * pad).sum()
        out["count"] = jnp.sum(jnp.ones_like(batch[f"label/{tasks[0]}"], jnp.float32) * pad)
        return out

    return metrics_fn


def stack_labels(labels: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{'task': labels} -> {'label/task': int32 labels} (the batch keys the loss reads)."""
    return {f"label/{t}": np.asarray(y, np.int32) for t, y in labels.items()}
