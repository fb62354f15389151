"""Optimizers for fine-tuning: optax SGD-momentum / AdamW, warmup + cosine / step schedules, weight
decay that skips norms and biases, gradient clipping, layer-wise learning-rate decay, and frozen
parameters that stay bit-identical.

    tx = make_optimizer(cfg, params, total_steps=1000,
                        trainable=trainable_mask(params, "partial", freeze_stages=2, model="resnet50"),
                        lr_scales=layer_lr_scales(params, 0.7, model="resnet50"))

Freezing uses `optax.multi_transform` with `optax.set_to_zero()` for frozen leaves: their update is
exactly 0.0, their optimizer state is empty (no momentum/Adam moments are allocated for them), and
weight decay never touches them. `stop_frozen_gradients` additionally cuts them out of the backward
pass, so a linear probe does not pay for backpropagating through the backbone.

Stages (for partial freezing and layer-wise decay) are an ordered list of regexes over the model's
top-level parameter names (Flax module names such as `conv1`, `layer1_0`, `fc`). ResNets use
`stem+layer1, layer2, layer3, layer4` so freezing k stages freezes conv1/bn1 and layer1..k; other
families default to one stage per top-level module in definition order, and any model accepts an
explicit list (`--stages 'conv1|bn1|layer1_.*,layer2_.*'`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

# Default stage plans by model family (the module that registered the model); regexes are full-matched.
FAMILY_STAGES: dict[str, tuple[str, ...]] = {
    "resnet": (r"conv1|bn1|layer1_\d+", r"layer2_\d+", r"layer3_\d+", r"layer4_\d+"),
}

# Leaves that are never weight-decayed whatever their rank (position embeddings, class tokens, ...).
NO_DECAY_DEFAULT: tuple[str, ...] = (
    r".*pos_embed.*",
    r".*class_token",
    r".*cls_token",
    r".*relative_position_bias_table",
)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01  # peak learning rate (for the batch size the run uses)
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    b1: float = 0.9  # adamw
    b2: float = 0.999  # adamw
    eps: float = 1e-8  # adamw
    weight_decay: float = 1e-4  # coupled (L2) for sgd as torch.optim.SGD, decoupled for adamw
    decay_norms_and_biases: bool = False  # False: rank<2 leaves (norm scales, biases) get no decay
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = 0  # linear warmup from 0 to `lr`
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    step_boundaries: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of the total steps
    step_factor: float = 0.1  # step schedule: lr multiplier at each boundary
    grad_clip_norm: float = 0.0  # clip the global gradient norm (of trainable leaves) to this; 0 = off
    layer_decay: float = 1.0  # layer-wise lr decay: stage i of n gets lr * layer_decay**(n - i); 1 = off
    # a moving average of the weights and BatchNorm statistics (train.TrainState.ema), evaluated and exported
    # beside them (e.g. 0.999); 0 = off
    ema_decay: float = 0.0

    def validate(self) -> None:
        if self.lr < 0 or self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise ValueError("lr, weight_decay and grad_clip_norm must be >= 0")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if any(not 0 < b < 1 for b in self.step_boundaries):
            raise ValueError(f"step_boundaries are fractions of the run in (0, 1), got {self.step_boundaries}")


# ------------------------------------------------------------------------------------ schedules
def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step: linear warmup, then cosine / step / constant."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    warmup = min(cfg.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps=rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "step":
        bounds = sorted({max(round(b * total_steps) - warmup, 1) for b in cfg.step_boundaries})
        main = optax.piecewise_constant_schedule(cfg.lr, {b: cfg.step_factor for b in bounds})
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose cosine, step or constant")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


# ---------------------------------------------------------------------------------------- masks
def _path_names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def decay_mask(
    params: PyTree, decay_norms_and_biases: bool = False, no_decay: Sequence[str] = NO_DECAY_DEFAULT
) -> PyTree:
    """True where weight decay applies: rank >= 2 leaves (kernels), never `no_decay` names.

    Norm scales/biases and all biases are rank 1, so they are skipped unless decay_norms_and_biases.
    """
    pats = [re.compile(p) for p in no_decay]

    def rule(path: tuple, leaf: Any) -> bool:
        name = _path_names(path)[-1]
        if any(p.fullmatch(name) for p in pats):
            return False
        return decay_norms_and_biases or jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(rule, params)


def top_level_names(params: Mapping[str, Any], model: str | None = None) -> list[str]:
    """Top-level module names in definition order.

    JAX tree operations return dicts with sorted keys, so a params tree that went through a train
    step has lost the order; with `model` the order is read from the model's definition instead.
    """
    if model is None:
        return list(params.keys())
    order = [n for n in definition_order(model) if n in params]
    return order + [n for n in params if n not in order]


@functools.cache
def definition_order(model: str) -> tuple[str, ...]:
    """The model's top-level parameter names in creation order (traced abstractly: no compute)."""
    from jtkd.models import create, get_spec

    spec = get_spec(model)
    module = create(model, num_classes=2)
    order: list[str] = []

    def init() -> Any:
        x = jnp.zeros((1, spec.input_size, spec.input_size, 3), jnp.float32)
        variables = module.init(jax.random.key(0), x, train=False)
        order.extend(variables["params"].keys())  # a trace-time side effect: the dict still has creation order
        return variables

    jax.eval_shape(init)
    return tuple(order)


def stage_plan(
    params: Mapping[str, Any],
    *,
    model: str | None = None,
    stages: Sequence[str] | None = None,
    head: Sequence[str] | None = None,
) -> list[list[str]]:
    """Ordered stages, each a list of top-level parameter names; the head is in none of them.

    `stages` (regexes, full-matched against top-level names) wins; else the family plan of `model`;
    else one stage per top-level module. Every non-head module must fall in exactly one stage.
    """
    head = list(head) if head is not None else head_names(model, params)
    names = [n for n in top_level_names(params, model) if n not in head]
    if stages is None and model is not None:
        stages = FAMILY_STAGES.get(_family(model))
    if not stages:
        return [[n] for n in names]
    pats = [re.compile(p) for p in stages]
    plan: list[list[str]] = [[] for _ in pats]
    unplaced = []
    for n in names:
        hits = [i for i, p in enumerate(pats) if p.fullmatch(n)]
        if len(hits) > 1:
            raise ValueError(f"top-level module {n!r} matches several stages: {[stages[i] for i in hits]}")
        if not hits:
            unplaced.append(n)
        else:
            plan[hits[0]].append(n)
    if unplaced:
        raise ValueError(
            f"top-level modules {unplaced} match no stage regex {list(stages)}; "
            f"the model's modules are {top_level_names(params, model)}"
        )
    empty = [stages[i] for i, s in enumerate(plan) if not s]
    if empty:
        raise ValueError(f"stage regexes {empty} match no top-level module of {top_level_names(params, model)}")
    return plan


def _family(model: str) -> str:
    from jtkd.models import get_spec

    return get_spec(model).family


def head_names(model: str | None, params: Mapping[str, Any] | None = None) -> list[str]:
    """Top-level names of the classifier: from the registry spec of `model` (e.g. ResNet 'fc')."""
    if model is None:
        return []
    from jtkd.models import get_spec

    top = get_spec(model).head_path[0]
    return [top] if params is None or top in params else []


Mode = Literal["full", "scratch", "linear", "partial"]


def trainable_mask(
    params: Mapping[str, Any],
    mode: str,
    *,
    freeze_stages: int = 0,
    model: str | None = None,
    stages: Sequence[str] | None = None,
    head: Sequence[str] | None = None,
) -> PyTree:
    """A pytree of bools, True where a parameter trains.

    full/scratch: everything; linear: only the head; partial: all but the first `freeze_stages` stages.
    """
    head = list(head) if head is not None else head_names(model, params)
    if mode in ("full", "scratch"):
        frozen: set[str] = set()
    elif mode == "linear":
        if not head:
            raise ValueError("mode='linear' needs the head's top-level names (pass model= or head=)")
        frozen = {n for n in params if n not in head}
    elif mode == "partial":
        plan = stage_plan(params, model=model, stages=stages, head=head)
        if not 0 <= freeze_stages <= len(plan):
            raise ValueError(f"freeze_stages={freeze_stages} but the model has {len(plan)} stages: {plan}")
        frozen = {n for s in plan[:freeze_stages] for n in s}
    else:
        raise ValueError(f"unknown mode {mode!r}; choose full, scratch, linear or partial")
    return {k: _fill(v, k not in frozen) for k, v in params.items()}


def layer_lr_scales(
    params: Mapping[str, Any],
    decay: float,
    *,
    model: str | None = None,
    stages: Sequence[str] | None = None,
    head: Sequence[str] | None = None,
) -> PyTree:
    """Per-leaf learning-rate multipliers: stage i (0-based) of n gets decay**(n - i), the head 1."""
    head = list(head) if head is not None else head_names(model, params)
    plan = stage_plan(params, model=model, stages=stages, head=head)
    scale = {n: decay ** (len(plan) - i) for i, s in enumerate(plan) for n in s}
    return {k: _fill(v, scale.get(k, 1.0)) for k, v in params.items()}


def _fill(tree: PyTree, value: Any) -> PyTree:
    return jax.tree.map(lambda _: value, tree)


def stop_frozen_gradients(params: PyTree, trainable: PyTree | None) -> PyTree:
    """Frozen leaves pass through `stop_gradient`, so XLA drops their part of the backward pass."""
    if trainable is None:
        return params
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


# ------------------------------------------------------------------------------------ optimizer
class _Empty(NamedTuple):
    pass


def scale_by_tree(scales: PyTree) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-leaf factor (layer-wise learning-rate decay).

    Inside `optax.multi_transform` the updates carry `optax.MaskedNode()` at other labels' leaves;
    those pass through.
    """

    def init(params: PyTree) -> _Empty:
        del params
        return _Empty()

    def update(updates: PyTree, state: _Empty, params: PyTree | None = None) -> tuple[PyTree, _Empty]:
        del params
        masked = lambda x: isinstance(x, optax.MaskedNode)
        out = jax.tree.map(
            lambda u, s: u if masked(u) else u * jnp.asarray(s, u.dtype), updates, scales, is_leaf=masked
        )
        return out, state

    return optax.GradientTransformation(init, update)


def make_optimizer(
    cfg: OptimConfig,
    params: PyTree,
    *,
    total_steps: int,
    trainable: PyTree | None = None,
    lr_scales: PyTree | None = None,
) -> optax.GradientTransformation:
    """The optax transformation for `cfg`.

    Order: clip the global norm -> (SGD: add L2 decay, momentum, -lr) | (AdamW: moments, decoupled
    decay, -lr) -> layer-wise scale. Frozen leaves (trainable=False) get exactly zero updates.
    (`ema_decay` is not an update rule: `train.TrainState.create(..., ema_decay=...)` keeps the average.)
    """
    cfg.validate()
    schedule = make_schedule(cfg, total_steps)
    # a callable mask is evaluated on the (possibly multi_transform-masked) parameter tree it is given
    mask = lambda p: decay_mask(p, cfg.decay_norms_and_biases)
    parts: list[optax.GradientTransformation] = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.optimizer == "sgd":
        if cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask))
        parts.append(optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    elif cfg.optimizer == "adamw":
        parts.append(optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=mask))
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")
    if lr_scales is not None:
        parts.append(scale_by_tree(lr_scales))
    tx = optax.chain(*parts)
    if trainable is None:
        return tx
    if jax.tree.structure(trainable) != jax.tree.structure(params):
        raise ValueError("`trainable` must have the structure of `params`")
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    if "train" not in jax.tree.leaves(labels):
        raise ValueError("every parameter is frozen: nothing to train")
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def count_params(params: PyTree, trainable: PyTree | None = None) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    sizes = jax.tree.map(lambda p: int(jnp.size(p)), params)
    total = sum(jax.tree.leaves(sizes))
    if trainable is None:
        return total, total
    return sum(s for s, t in zip(jax.tree.leaves(sizes), jax.tree.leaves(trainable)) if t), total
