"""Fine-tuning modes on top of the shared train step: full, scratch, linear probe, partial freezing.

    cfg = FinetuneConfig(model="resnet50", mode="partial", freeze_stages=2)
    variables = initial_variables(cfg, num_classes=10, state_dict=torch_state_dict)  # head re-initialised
    ft = Finetuner(cfg, variables, num_classes=10, mesh=train.make_mesh())
    variables, history = ft.fit(variables, train_arrays, eval_arrays, workdir="runs/x")

Modes
  full     every parameter trains (from the imported weights).
  scratch  every parameter trains from a random init (the baseline transfer must beat).
  linear   only the new head trains; the backbone is a fixed feature extractor run with train=False
           (BatchNorm in inference mode). With precompute_features the backbone (num_classes=0) runs
           once over the data and only the head trains, on cached features.
  partial  the first `freeze_stages` stages are frozen (see `jtkd.optim` for stages).

Frozen parameters get exactly zero updates (optax.multi_transform + set_to_zero) and are cut out of
the backward pass with stop_gradient. BatchNorm (`bn`):
  train        batch statistics everywhere, running statistics updated (torch's model.train()).
  eval         running statistics everywhere and never updated; dropout etc. still train.
  frozen_eval  frozen stages in inference mode (their statistics stay fixed, as their weights do),
               trainable stages in train mode.
  auto         linear -> eval (whole forward train=False), partial -> frozen_eval, else train.

`mixup_alpha` / `cutmix_alpha` mix each training batch in the step (`jtkd.mixup`); the loss is then
cross-entropy on the mixed soft targets, the reported train accuracy is of the unmixed labels.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtkd import mixup, models, optim, train
from jtkd.loop import ArraySource, Batch, EvalSource, LoopConfig, Trainer, classification_eval
from jtkd.models import layers
from jtkd.optim import OptimConfig

Mode = Literal["full", "scratch", "linear", "partial"]
BNMode = Literal["auto", "train", "eval", "frozen_eval"]


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    model: str = "resnet18"
    mode: Mode = "full"
    freeze_stages: int = 2  # partial: freeze this many leading stages
    stages: tuple[str, ...] = ()  # stage regexes over top-level module names (empty: the family default)
    # the classifier: new (zeros, or the model's init from `seed`), or the checkpoint's own (same classes:
    # continuing a run, or full fine-tuning after a linear probe)
    head_init: Literal["zero", "seeded", "keep"] = "zero"
    bn: BNMode = "auto"
    precompute_features: bool = True  # linear: train the head on cached backbone features
    label_smoothing: float = 0.0
    # MixUp / CutMix (jtkd.mixup): Beta(alpha, alpha) weights; with both > 0 each step picks one (torchvision's
    # reference recipe uses 0.2 and 1.0); 0 turns it off
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters stay float32
    image_size: int = 224
    batch_size: int = 64  # global
    eval_batch_size: int = 256  # global
    seed: int = 0  # head init, data order, dropout
    num_devices: int = 0  # 0: every device
    workdir: str = ""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)

    def validate(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.batch_size % self.loop.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} does not divide into loop.accum_steps="
                             f"{self.loop.accum_steps} micro-batches")
        if self.mode == "partial" and self.freeze_stages < 1:
            raise ValueError("mode='partial' needs freeze_stages >= 1 (0 is mode='full')")
        mixup.make_batch_transform(self.mixup_alpha, self.cutmix_alpha)  # checks the alphas
        if self.mixing and self.mode == "linear" and self.precompute_features:
            raise ValueError("mixup_alpha / cutmix_alpha mix images, and a linear probe on cached features sees none: "
                             "set precompute_features false (--no-precompute_features) to mix")
        models.check_input_size(self.model, self.image_size)

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def bn_mode(self) -> str:
        if self.bn != "auto":
            return self.bn
        return {"linear": "eval", "partial": "frozen_eval"}.get(self.mode, "train")

    @property
    def compute_dtype(self) -> Any:
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


# ----------------------------------------------------------------------------------- variables
def initial_variables(cfg: FinetuneConfig, num_classes: int, state_dict: Mapping[str, Any] | None = None) -> dict:
    """Start variables: a random init (scratch) or `state_dict` converted with a new `num_classes` head."""
    cfg.validate()
    key = jax.random.key(cfg.seed)
    if cfg.mode == "scratch":
        return models.init(cfg.model, key, cfg.image_size, num_classes=num_classes)
    if state_dict is None:
        raise ValueError(
            f"mode={cfg.mode!r} fine-tunes pretrained weights: pass a torch state_dict (or use mode='scratch')"
        )
    from converters.torchvision import convert, implied_kwargs

    if cfg.head_init == "keep":
        variables = convert(cfg.model, state_dict)
        if (have := models.num_classes(cfg.model, variables)) != num_classes:
            raise ValueError(
                f"head_init='keep': the checkpoint's classifier has {have} outputs but the data has {num_classes} "
                "classes; head_init 'zero' or 'seeded' gives a new classifier"
            )
    else:
        variables = convert(cfg.model, state_dict, head="reinit", num_classes=num_classes, rng=key)
    if models.get_spec(cfg.model).size_kwarg:  # ViT: embeddings resampled for image_size
        if (was := models.input_size(cfg.model, implied_kwargs(cfg.model, variables))) != cfg.image_size:
            from jtkd.loop import _info

            _info(f"{cfg.model}: the checkpoint's positional embeddings resampled from {was} to {cfg.image_size} px")
        variables = models.at_size(cfg.model, variables, cfg.image_size)
    if cfg.head_init == "zero":
        variables = zero_head(cfg.model, variables)
    return variables


def zero_head(model: str, variables: dict) -> dict:
    """The classifier's parameters set to zero (every class starts equally likely)."""
    params = dict(variables["params"])
    for name in optim.head_names(model, params):
        params[name] = jax.tree.map(np.zeros_like, params[name])
    return {**variables, "params": params}


# ------------------------------------------------------------------------------------ BN modes
@contextlib.contextmanager
def batchnorm_inference(predicate: Callable[[tuple[str, ...]], bool]):
    """Within the context, `layers.BatchNorm` modules whose path satisfies `predicate` run with
    train=False (running statistics, no update) whatever the model was called with."""

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, layers.BatchNorm) and context.method_name == "__call__" and predicate(tuple(mod.scope.path)):
            if len(args) >= 2:
                args = (args[0], False, *args[2:])
            else:
                kwargs = {**kwargs, "train": False}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def finetune_loss(
    *,
    label_smoothing: float = 0.0,
    bn: str = "train",
    trainable: Any = None,
    frozen_modules: frozenset[str] = frozenset(),
    input_key: str = "image",
    label_key: str = "label",
) -> train.LossFn:
    """Cross-entropy (label-smoothed, `train.cross_entropy`) with frozen leaves cut from the backward
    pass and BatchNorm per `bn` ('train' | 'eval' | 'frozen_eval' | 'inference' = whole forward train=False)."""
    if bn not in ("train", "eval", "frozen_eval", "inference"):
        raise ValueError(f"unknown bn mode {bn!r}")

    def loss_fn(params, state, batch, rng, extra):
        params = optim.stop_frozen_gradients(params, trainable)
        variables = {"params": params, "batch_stats": state.batch_stats}
        x = batch[input_key]
        if bn == "inference":
            logits, batch_stats = state.apply_fn(variables, x, train=False), state.batch_stats
        else:
            if bn == "eval":
                ctx = batchnorm_inference(lambda path: True)
            elif bn == "frozen_eval":
                ctx = batchnorm_inference(lambda path: bool(path) and path[0] in frozen_modules)
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                logits, mutated = state.apply_fn(
                    variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
                )
            batch_stats = mutated.get("batch_stats", state.batch_stats)
        if isinstance(logits, tuple):
            logits = logits[0]
        labels = batch[label_key]
        loss = train.cross_entropy(logits, mixup.targets(batch, logits.shape[-1], label_key), label_smoothing)
        acc = (logits.argmax(-1) == labels).mean()  # of the unmixed labels with MixUp / CutMix
        return loss, (batch_stats, {"loss": loss, "accuracy": acc})

    return loss_fn


# ------------------------------------------------------------------------------ linear probe
class Head(nn.Module):
    """The model's classifier on its own, at its module path `names` in the model: params
    {'fc': {'kernel', 'bias'}} for ('fc',), {'heads': {'head': {...}}} for ViT's ('heads', 'head')."""

    num_classes: int
    names: tuple[str, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if len(self.names) > 1:
            return Head(self.num_classes, self.names[1:], self.dtype, name=self.names[0])(x)
        return layers.Linear(self.num_classes, dtype=self.dtype, name=self.names[0])(x.astype(self.dtype)).astype(
            jnp.float32
        )




def split_head(model: str, variables: dict) -> tuple[dict, dict]:
    """(backbone variables for num_classes=0, head params {name: {...}}); auxiliary classifiers
    (googlenet, inception_v3) belong to neither: a num_classes=0 model has none."""
    names = optim.head_names(model, variables["params"])
    if not names:
        raise ValueError(f"{model}: no classifier found in the variables")
    drop = {*names, *models.aux_heads(model, variables["params"])}
    backbone = {**variables, "params": {k: v for k, v in variables["params"].items() if k not in drop}}
    return backbone, {k: variables["params"][k] for k in names}


def check_linear_head(model: str, variables: dict) -> None:
    """Precomputed features need logits == Linear(head)(model(num_classes=0)); say why not otherwise."""
    backbone, head = split_head(model, variables)
    shapes = models.shapes(models.create(model, num_classes=0), 32)
    if jax.tree.structure(shapes["params"]) != jax.tree.structure(backbone["params"]):
        raise ValueError(
            f"{model}: the classifier is more than one Linear layer after the pooled features; "
            "use --no-precompute_features"
        )
    path, p = models.get_spec(model).head_path, head
    for name in path:  # nothing beside the Linear layer on its way (ViT's heads.pre_logits)
        p = p[name] if isinstance(p, Mapping) and set(p) == {name} else {}
    if not isinstance(p, Mapping) or set(p) != {"kernel", "bias"} or np.ndim(p["kernel"]) != 2:
        raise ValueError(f"{model}: head {'.'.join(path)!r} is not a Linear layer; use --no-precompute_features")


class FeatureExtractor:
    """Backbone (num_classes=0, train=False) outputs for every example, compiled once per instance; with
    `logits=True` the whole model's logits instead (its classes those of `template`)."""

    def __init__(
        self, model: str, mesh: Any, batch_size: int = 256, dtype: Any = jnp.float32, progress: bool = True,
        template: Mapping[str, Any] | None = None, logits: bool = False,
    ) -> None:
        from converters.torchvision import flax_module

        self.model, self.mesh, self.batch_size, self.progress, self.logits = model, mesh, batch_size, progress, logits
        # template: variables whose shapes fix the builder kwargs (a ViT's image_size, MNASNet's stem)
        head = {} if logits else {"num_classes": 0}
        module = flax_module(model, template, dtype=dtype, **head)

        def fwd(v: Any, x: jax.Array) -> jax.Array:
            out = module.apply(v, x, train=False)
            return out[0] if isinstance(out, tuple) else out

        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.AXIS))
        self._fwd = jax.jit(fwd, out_shardings=rows)

    def __call__(
        self, variables: dict, data: Mapping[str, np.ndarray] | Iterable[Batch], desc: str = "features"
    ) -> dict[str, np.ndarray]:
        """{'features' (or 'logits'), 'label', ...} for `data`: in-memory arrays (with 'image') or an iterable
        of evaluation batches (padded rows marked by 'mask', as `EvalSource` / `jtkd.data.batches(train=False)`
        give). Multi-host, each process gets the outputs of its own rows."""
        from tqdm.auto import tqdm

        used = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        v = train.replicate(self.mesh, used if self.logits else split_head(self.model, variables)[0])
        key = "logits" if self.logits else "features"
        batches = EvalSource(data, self.batch_size) if isinstance(data, Mapping) else data
        out: dict[str, list[np.ndarray]] = {}
        for batch in tqdm(batches, desc=desc, leave=False, disable=not self.progress or jax.process_index() != 0):
            keep = np.asarray(batch["mask"]).astype(bool) if "mask" in batch else slice(None)
            feats = self._fwd(v, train.shard_batch(self.mesh, {"image": batch["image"]})["image"])
            shards = sorted(feats.addressable_shards, key=lambda sh: sh.index[0].start or 0)
            local = np.concatenate([np.asarray(sh.data) for sh in shards])  # this process's rows, in order
            out.setdefault(key, []).append(local[keep].astype(np.float32))
            for k, val in batch.items():
                if k not in ("image", "mask"):
                    out.setdefault(k, []).append(np.asarray(val)[keep])
        return {k: np.concatenate(v) for k, v in out.items()}


def extract_features(
    model: str,
    variables: dict,
    data: Mapping[str, np.ndarray] | Iterable[Batch],
    mesh: Any,
    batch_size: int = 256,
    dtype: Any = jnp.float32,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """One-off `FeatureExtractor(model, mesh, ...)(variables, data)`."""
    return FeatureExtractor(model, mesh, batch_size, dtype, template=variables)(variables, data, desc)


# ---------------------------------------------------------------------------------- Finetuner
class Finetuner:
    """One fine-tuning configuration, compiled once; `fit` runs it from given start variables.

    Several seeds reuse the compiled step: the optimizer, model and loss objects are built here
    once (they are static parts of the TrainState and of the jit cache key).
    """

    def __init__(
        self, cfg: FinetuneConfig, template: dict, num_classes: int, mesh: Any, evaluator: Evaluator | None = None
    ) -> None:
        cfg.validate()
        from converters.torchvision import flax_module

        self.cfg, self.num_classes, self.mesh = cfg, num_classes, mesh
        train.check_batch_size(mesh, cfg.batch_size, cfg.loop.accum_steps)
        self.probe = cfg.mode == "linear" and cfg.precompute_features
        dtype = cfg.compute_dtype
        stages = cfg.stages or None
        if self.probe:
            check_linear_head(cfg.model, template)
            _, head = split_head(cfg.model, template)
            self.module: nn.Module = Head(num_classes, models.get_spec(cfg.model).head_path, dtype=dtype)
            params = head
            self.trainable = None
            frozen: frozenset[str] = frozenset()
            input_key, bn = "features", "inference"
        else:
            params = template["params"]
            # The loss is on the main logits, so an auxiliary classifier (googlenet, inception_v3) would only
            # cost compute, and inception_v3's needs 299 px inputs: train without it, carrying its
            # parameters unchanged (frozen) so the exported checkpoint keeps them.
            aux = models.aux_heads(cfg.model, params)
            no_aux = {"aux_logits": False} if aux else {}
            self.module = flax_module(
                cfg.model, template, num_classes=num_classes, dtype=dtype, axis_name=train.AXIS, **no_aux
            )
            self.trainable = optim.trainable_mask(
                params, cfg.mode, freeze_stages=cfg.freeze_stages, model=cfg.model, stages=stages
            )
            self.trainable = {k: jax.tree.map(lambda _: False, v) if k in aux else v for k, v in self.trainable.items()}
            frozen = frozenset(k for k, v in self.trainable.items() if not any(jax.tree.leaves(v)))
            self.trainable = None if not frozen else self.trainable
            input_key = "image"
            bn = "inference" if cfg.mode == "linear" and cfg.bn_mode == "eval" else cfg.bn_mode
        self.input_key, self.frozen_modules = input_key, frozen
        lr_scales = None
        if cfg.optim.layer_decay < 1.0:
            if self.probe:
                raise ValueError("layer_decay has no effect on a linear probe of cached features")
            lr_scales = optim.layer_lr_scales(params, cfg.optim.layer_decay, model=cfg.model, stages=stages)
        self.schedule = optim.make_schedule(cfg.optim, cfg.loop.steps)
        self.tx = optim.make_optimizer(
            cfg.optim, params, total_steps=cfg.loop.steps, trainable=self.trainable, lr_scales=lr_scales
        )
        loss = finetune_loss(
            label_smoothing=cfg.label_smoothing,
            bn=bn,
            trainable=self.trainable,
            frozen_modules=frozen,
            input_key=input_key,
        )
        mix = mixup.make_batch_transform(cfg.mixup_alpha, cfg.cutmix_alpha, image_key=input_key, axis_name=train.AXIS)
        self.trainer = Trainer(
            mesh, loss, classification_eval(input_key), config=cfg.loop, schedule=self.schedule, batch_transform=mix
        )
        self._apply = self.module.apply  # one bound method object: part of the jit cache key
        self.features = (
            FeatureExtractor(cfg.model, mesh, cfg.eval_batch_size, dtype, cfg.loop.progress, template)
            if self.probe
            else None
        )
        # a shared full-model evaluator saves compiling one eval step per mode (not for cached features)
        self.evaluator = None if self.probe else evaluator

    def init_state(self, variables: dict, seed: int | None = None) -> train.TrainState:
        if self.probe:
            _, head = split_head(self.cfg.model, variables)
            variables = {"params": head, "batch_stats": {}}
        # host copies: the train step donates its state, which must never alias the caller's arrays
        v = jax.device_get({"params": variables["params"], "batch_stats": variables.get("batch_stats", {})})
        state = train.TrainState.create(self._apply, v, self.tx, seed=self.cfg.seed if seed is None else seed,
                                        ema_decay=self.cfg.optim.ema_decay, trainable=self.trainable)
        return train.replicate(self.mesh, state)

    def data(
        self,
        variables: dict,
        train_arrays: Mapping[str, np.ndarray],
        eval_arrays: Mapping[str, np.ndarray] | None,
        augment: Callable[[Batch, np.random.Generator], Batch] | None = None,
        seed: int | None = None,
    ) -> tuple[ArraySource, EvalSource | None]:
        """Train/eval sources for this mode (cached backbone features for a precomputed probe)."""
        cfg = self.cfg
        seed = cfg.seed if seed is None else seed
        if self.probe:
            if augment is not None:
                raise ValueError("augmentation cannot apply to cached features; use --no-precompute_features")
            train_arrays = self.features(variables, train_arrays, "train features")
            eval_arrays = self.features(variables, eval_arrays, "eval features") if eval_arrays is not None else None
        src = ArraySource(train_arrays, cfg.batch_size, seed=seed, augment=augment)
        ev = EvalSource(eval_arrays, cfg.eval_batch_size) if eval_arrays is not None else None
        return src, ev

    def merge(self, variables: dict, state: train.TrainState) -> dict:
        """Full-model variables from the trained state (the probe's head goes back into the model)."""
        trained = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        if not self.probe:
            return trained
        return {**variables, "params": {**variables["params"], **trained["params"]}}

    def fit(
        self,
        variables: dict,
        train_arrays: Mapping[str, np.ndarray],
        eval_arrays: Mapping[str, np.ndarray] | None = None,
        *,
        augment: Callable[[Batch, np.random.Generator], Batch] | None = None,
        workdir: str | Path | None = None,
        seed: int | None = None,
        desc: str | None = None,
    ) -> tuple[dict, list[dict[str, Any]]]:
        """Train from `variables`; returns the full model's final variables and the metric rows."""
        src, ev = self.data(variables, train_arrays, eval_arrays, augment, seed)
        if ev is not None and self.evaluator is not None:
            ev = self.evaluator.bind(eval_arrays)
        state = self.init_state(variables, seed)
        state, history = self.trainer.fit(state, src, ev, workdir=workdir, desc=desc or self.cfg.mode)
        return self.merge(variables, state), history


class Evaluator:
    """Accuracy/loss of full-model variables on a split; compiled once per (model, classes, dtype)."""

    def __init__(
        self, model: str, num_classes: int, mesh: Any, batch_size: int = 256, dtype: Any = jnp.float32,
        template: Mapping[str, Any] | None = None,
    ) -> None:
        from converters.torchvision import flax_module

        self.model, self.mesh, self.batch_size = model, mesh, batch_size
        # template: variables whose shapes fix the builder kwargs (a ViT's image_size, MNASNet's stem)
        self.module = flax_module(model, template, num_classes=num_classes, dtype=dtype)
        self._apply = self.module.apply
        self._step = train.make_eval_step(mesh, classification_eval())

    def __call__(self, variables: dict, data: Mapping[str, np.ndarray] | Iterable[Batch]) -> dict[str, float]:
        """`data`: in-memory arrays, or re-iterable evaluation batches (padding marked by 'mask')."""
        from jtkd.loop import sums_to_means

        v = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        state = train.replicate(self.mesh, train.TrainState.create(self._apply, v, _NO_TX))
        total = None
        batches = EvalSource(data, self.batch_size) if isinstance(data, Mapping) else data
        for batch in batches:
            sums = self._step(state, train.shard_batch(self.mesh, batch))
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return sums_to_means(jax.device_get(total), "")

    def bind(
        self, data: Mapping[str, np.ndarray] | Iterable[Batch], prefix: str = "eval/"
    ) -> Callable[[Any], dict[str, float]]:
        """`state -> {'eval/accuracy', ...}` on `data`, for `Trainer.fit(eval_data=...)`."""
        return lambda state: {
            prefix + k: v for k, v in self({"params": state.params, "batch_stats": state.batch_stats}, data).items()
        }


_NO_TX = optax.identity()  # one object: the tx is part of the TrainState's static structure (jit cache key)


def evaluate_variables(
    model: str,
    variables: dict,
    arrays: Mapping[str, np.ndarray],
    mesh: Any,
    batch_size: int = 256,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Accuracy/loss of full-model `variables` on `arrays` (every example counted once); compiles each call."""
    if num_classes is None:
        num_classes = models.num_classes(model, variables)
    return Evaluator(model, num_classes, mesh, batch_size, template=variables)(variables, arrays)
