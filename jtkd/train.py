"""Data-parallel, jit-compiled train steps: `(state, batch) -> (state, metrics)`.

pmap semantics written with `jax.jit` + `jax.shard_map` over a 1-D `Mesh` with axis 'data': the
batch is split over devices, parameters are replicated, gradients and BatchNorm statistics are
averaged over the axis (the model is built with `axis_name='data'`). One code path serves 1..N
devices and multi-host runs (`jax.distributed.initialize()` before building the mesh).

The gradient of a replicated parameter under `shard_map` (check_vma=True) is already summed over
the axis, so each device differentiates `local_mean_loss / axis_size`: the sum is the global mean.
A one-device mesh runs unchecked, without that sum, which XLA:CPU would run as a copy of every gradient.

Gradient accumulation (`accum_steps=k`) runs each device's shard as k micro-batches in a `lax.scan`
and averages their gradients into one optimizer update, as torch's `(loss / k).backward()` k times
then `optimizer.step()`: activations are held for one micro-batch at a time. Micro-batch j is every
k-th row of the global batch from row j, whatever the device count, so a run does not depend on how
many devices it is split over. BatchNorm normalises each micro-batch with its own statistics and
updates its running statistics k times a step, as torch does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jtkd import mixup

AXIS = "data"
_BATCH_STREAM = 0x7FFFFFFF  # folded where `step_rng` folds a device index: a stream no device's key uses
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs; `apply_fn`, `tx` and `ema_decay` are static (not checkpointed)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpointable)
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    # a moving average of {'params', 'batch_stats'} (timm's ModelEmaV2), updated after every step as
    # ema <- ema + (1 - ema_decay) * (new - ema) from the initial variables; None when ema_decay is 0.
    # Its 'params' hold the trainable leaves only: a frozen leaf's average would be the leaf itself.
    ema: Any = None
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

    @classmethod
    def create(
        cls,
        apply_fn: Callable,
        variables: Mapping[str, Any],
        tx: optax.GradientTransformation,
        seed: int = 0,
        ema_decay: float = 0.0,
        trainable: Any = None,
    ) -> TrainState:
        """`trainable`: a bool pytree like the params (`optim.trainable_mask`), None for all; the average
        keeps only those parameters (and every BatchNorm statistic)."""
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        ema = None
        if ema_decay:  # a copy: a step that donates its state must not meet one buffer twice
            ema = jax.tree.map(
                lambda a: jnp.array(a, copy=True), {"params": _select(params, trainable), "batch_stats": batch_stats}
            )
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(seed)),
            apply_fn=apply_fn,
            tx=tx,
            ema=ema,
            ema_decay=ema_decay,
        )

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def averaged(self) -> TrainState | None:
        """This state with its moving-average weights and BatchNorm statistics in place of its own (to
        evaluate or export them), or None without an average."""
        if self.ema is None:
            return None
        return self.replace(params=_overlay(self.params, self.ema["params"]), batch_stats=self.ema["batch_stats"])


def _select(tree: Any, mask: Any) -> Any:
    """The nested dict of `tree`'s leaves whose `mask` leaf is true; `tree` itself for mask=None."""
    if mask is None:
        return tree
    flat, keep = flatten_dict(tree), flatten_dict(mask)
    return unflatten_dict({k: v for k, v in flat.items() if keep[k]})


def _key_path(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _overlay(tree: Any, part: Any) -> Any:
    """`tree` (its containers kept) with the leaves `part` (a `_select` of it) holds replaced by part's."""
    if jax.tree.structure(part) == jax.tree.structure(tree):
        return part
    flat = flatten_dict(part)
    return jax.tree_util.tree_map_with_path(lambda path, x: flat.get(_key_path(path), x), tree)


def _like(tree: Any, part: Any) -> Any:
    """The leaves of `tree` at the paths `part` (a `_select` of it) has, in part's structure."""
    if jax.tree.structure(part) == jax.tree.structure(tree):
        return tree
    flat = {_key_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return unflatten_dict({k: flat[k] for k in flatten_dict(part)})


class LossFn(Protocol):
    def __call__(
        self, params: Any, state: TrainState, batch: Batch, rng: jax.Array, extra: Any
    ) -> tuple[jax.Array, tuple[Any, Metrics]]:
        """Per-device mean loss on the local shard, and (new batch_stats, metrics)."""


def make_mesh(num_devices: int | None = None, devices: list | None = None) -> Mesh:
    """A 1-D mesh named 'data' over the first `num_devices` devices (all of them, all hosts, by default)."""
    devices = devices if devices is not None else jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} available")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,))


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Place a host pytree replicated on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def check_batch_size(mesh: Mesh, rows: int, accum_steps: int = 1, what: str = "batch_size") -> None:
    """A clear error, before anything is built, when a global batch of `rows` does not split evenly over
    the mesh's devices, or a device's share into `accum_steps` micro-batches."""
    n = mesh.shape[AXIS]
    if rows % n:
        raise ValueError(f"{what}={rows} does not split over {n} devices: use a multiple of {n} (or fewer devices)")
    if (rows // n) % accum_steps:
        raise ValueError(
            f"{what}={rows} gives {rows // n} rows per device, which accum_steps={accum_steps} micro-batches do not "
            f"divide: use a multiple of {n * accum_steps}"
        )


def shard_batch(mesh: Mesh, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Split a host batch along its leading axis over the mesh.

    Multi-host: each process passes its own slice of the global batch (process-local data);
    the leading size must divide by the number of local devices.
    """
    sharding = NamedSharding(mesh, P(AXIS))
    n_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    out = {}
    for k, v in batch.items():
        if np.shape(v)[0] % n_local:
            raise ValueError(f"batch[{k!r}] has {np.shape(v)[0]} rows, not divisible by {n_local} local devices")
        out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
    return out


def step_rng(state: TrainState) -> jax.Array:
    """A fresh key per step and per device (dropout, stochastic depth differ across shards)."""
    key = jax.random.wrap_key_data(state.rng)
    key = jax.random.fold_in(key, state.step)
    return jax.random.fold_in(key, jax.lax.axis_index(AXIS))


def batch_rng(state: TrainState) -> jax.Array:
    """A fresh key per step, the same on every device (one draw per global batch, e.g. MixUp's lambda)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return jax.random.fold_in(key, _BATCH_STREAM)


def micro_batches(batch: Batch, accum_steps: int) -> Batch:
    """Each (rows, ...) leaf as (accum_steps, rows / accum_steps, ...): micro-batch j holds rows j, j + k, ..."""

    def split(a: jax.Array) -> jax.Array:
        if a.shape[0] % accum_steps:
            raise ValueError(
                f"accum_steps={accum_steps} does not divide the {a.shape[0]} rows of a device's batch: the "
                "batch size per device must be a multiple of accum_steps"
            )
        return jnp.swapaxes(a.reshape(a.shape[0] // accum_steps, accum_steps, *a.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    mesh: Mesh,
    loss_fn: LossFn,
    donate: bool = True,
    accum_steps: int = 1,
    batch_transform: Callable[[Batch, jax.Array], Batch] | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """jit(shard_map(step)): `step(state, batch, extra=None) -> (state, metrics)`.

    `loss_fn` sees the local shard (a micro-batch of it with `accum_steps` > 1: see the module
    docstring); `batch_transform(shard, key)` runs on the whole local shard first, with a key that is
    the same on every device (e.g. `mixup.make_batch_transform`); `extra` is a replicated pytree passed through untouched (e.g. a frozen teacher's
    variables) so it is an argument, not a compile-time constant. Metrics are averaged over devices
    and micro-batches.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    n = mesh.shape[AXIS]

    def gradients(
        params: Any, state: TrainState, batch: Batch, rng: jax.Array, extra: Any
    ) -> tuple[Any, Any, Metrics]:
        def objective(params: Any) -> tuple[jax.Array, tuple[Any, Metrics]]:
            loss, aux = loss_fn(params, state, batch, rng, extra)
            # summed over the devices (and the micro-batches): the global mean
            return loss / (n * accum_steps), aux

        grads, (batch_stats, metrics) = jax.grad(objective, has_aux=True)(params)
        return grads, batch_stats, metrics

    def local_step(state: TrainState, batch: Batch, extra: Any) -> tuple[TrainState, Metrics]:
        if batch_transform is not None:
            batch = batch_transform(batch, batch_rng(state))
        rng = step_rng(state)
        if accum_steps == 1:
            grads, batch_stats, metrics = gradients(state.params, state, batch, rng, extra)
        else:
            # Per-device copies of the parameters have per-device gradients: summed over the devices once,
            # after the micro-batches, not (implicitly, as replicated parameters' are) in each of them.
            local = jax.lax.pcast(state.params, AXIS, to="varying") if n > 1 else state.params

            def micro_step(carry: tuple[Any, Any], xs: tuple[jax.Array, Batch]) -> tuple[tuple[Any, Any], Metrics]:
                total, stats = carry
                i, micro = xs
                g, stats, m = gradients(local, state.replace(batch_stats=stats), micro, jax.random.fold_in(rng, i), extra)
                return (jax.tree.map(jnp.add, total, g), stats), m

            zeros = jax.tree.map(jnp.zeros_like, local)
            (grads, batch_stats), metrics = jax.lax.scan(
                micro_step, (zeros, state.batch_stats), (jnp.arange(accum_steps), micro_batches(batch, accum_steps))
            )
            grads = jax.lax.psum(grads, AXIS) if n > 1 else grads
            metrics = jax.tree.map(lambda m: m.mean(0), metrics)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics = jax.lax.pmean(metrics, AXIS)
        ema = state.ema
        if ema is not None:  # a leaf that does not move keeps an average bit-identical to it
            keep = 1 - state.ema_decay
            new = {"params": _like(params, ema["params"]), "batch_stats": batch_stats}
            ema = jax.tree.map(lambda e, x: e + keep * (x - e), ema, new)
        new = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema
        )
        return new, metrics

    # On one device the gradients' implicit psum is an all-reduce over one participant, which XLA:CPU
    # still runs as a copy of every gradient (vit_b_16: 68 ms a step). Unchecked, the gradient is the
    # local one, which on one device is all of it.
    sharded = jax.shard_map(
        local_step, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P()), check_vma=n > 1
    )

    @partial(jax.jit, donate_argnums=(0,) if donate else ())
    def step(state: TrainState, batch: Batch, extra: Any = None) -> tuple[TrainState, Metrics]:
        return sharded(state, batch, extra)

    return step


def make_eval_step(mesh: Mesh, metrics_fn: Callable[[TrainState, Batch, Any], Metrics]) -> Callable[..., Metrics]:
    """jit(shard_map) evaluation: `metrics_fn` returns per-device *sums*; they are summed over devices."""

    def local(state: TrainState, batch: Batch, extra: Any) -> Metrics:
        return jax.lax.psum(metrics_fn(state, batch, extra), AXIS)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P())
    return jax.jit(lambda state, batch, extra=None: sharded(state, batch, extra))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean over the batch of -sum_c q_c log softmax(logits)_c, with q = (1-eps)*t + eps/C where t is
    onehot(labels) for class indices (B,) or `labels` itself for class probabilities (B, C) (torch's
    `CrossEntropyLoss(label_smoothing=eps)` on either kind of target)."""
    num_classes = logits.shape[-1]
    t = labels if labels.ndim == logits.ndim else jax.nn.one_hot(labels, num_classes)
    q = optax.smooth_labels(t, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), q).mean()


def forward(state: TrainState, params: Any, images: jax.Array, rng: jax.Array, train_mode: bool) -> tuple[Any, Any]:
    """(model outputs, batch_stats after the pass): train mode updates BatchNorm statistics and draws
    dropout from `rng`; inference mode leaves them as they are."""
    variables = {"params": params, "batch_stats": state.batch_stats}
    if not train_mode:
        return state.apply_fn(variables, images, train=False), state.batch_stats
    out, mutated = state.apply_fn(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    return out, mutated.get("batch_stats", state.batch_stats)


def classification_loss(label_smoothing: float = 0.0, train_mode: bool = True) -> LossFn:
    """Supervised fine-tuning loss: cross-entropy on batch['image'], batch['label'].

    train_mode=False runs the model in inference mode (frozen BN statistics, no dropout), as a
    linear probe on a fixed feature extractor wants.
    """

    def loss_fn(params: Any, state: TrainState, batch: Batch, rng: jax.Array, extra: Any):
        logits, batch_stats = forward(state, params, batch["image"], rng, train_mode)
        if isinstance(logits, tuple):  # models with auxiliary heads: the main logits drive the loss
            logits = logits[0]
        loss = cross_entropy(logits, mixup.targets(batch, logits.shape[-1]), label_smoothing)
        acc = (logits.argmax(-1) == batch["label"]).mean()  # of the unmixed labels with MixUp / CutMix
        return loss, (batch_stats, {"loss": loss, "accuracy": acc})

    return loss_fn
