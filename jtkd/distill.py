"""Knowledge distillation from frozen (converted PyTorch) teachers into any jtkd student.

    objective = distill.make_objective(DistillConfig(method="dkd"))
    student = distill.DistillStudent(models.create("resnet18", 10, axis_name=train.AXIS),
                                     distill.connectors_for(objective, ...))
    state = distill.create_state(student, student_vars, objective, teachers, teacher_vars, tx, image_size=32)
    step = train.make_train_step(mesh, distill.distill_loss(objective, teachers, steps_per_epoch))
    state, metrics = step(state, batch, train.replicate(mesh, teacher_vars))   # teachers: the `extra` argument

Every objective is the "knowledge transfer network" loss

    L = ce_weight * CE(y, S(x)) + sum_i lambda_i * l_i(T(x), S(x))

with l_i any of the losses of `jtkd.losses` (`method="kd+at"` combines terms). The teachers run in
inference mode (frozen BatchNorm statistics, no dropout) under `jax.lax.stop_gradient` on the same
augmented images as the student, inside the same jit-compiled data-parallel step; their variables
are the step's replicated `extra` argument, never compile-time constants. Feature methods read the
named outputs the models sow into the 'features' collection ('layer1'..'layer4', 'pooled' for
ResNets). Trainable connectors (FitNets' regressors) live next to the student in the train state:
params = {'student': ..., 'connector': ...}.

Several teachers: logit terms match the (weighted) average of the teachers' softened distributions,
feature terms average the per-teacher losses; or, with `MultiHeadStudent`, head k learns teacher k
(multi-task distillation, one head per teacher, weighted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtkd import losses, mixup, models
from jtkd.models import collect_features, layers
from jtkd.train import AXIS, Batch, LossFn, Metrics, TrainState

Array = jax.Array
LOGIT_METHODS = ("kd", "dkd", "lskd")
FEATURE_METHODS = ("fitnet", "at", "rkd", "pkt", "sp")
METHODS = ("ce",) + LOGIT_METHODS + FEATURE_METHODS

# (ce_weight, lambda, temperature) as the reference implementations set them for CIFAR-100:
# RepDistiller (KD -r 0.1 -a 0.9, FitNets 100, AT 1000, RKD 1, PKT 30000, SP 3000), mdistiller (DKD: CE 1,
# alpha 1, beta 8, T 4, warmup 20) and Sun et al. 2024 (KD + logit standardisation: CE 0.1, 9, T 2).
_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "ce": (1.0, 0.0, 1.0),
    "kd": (0.1, 0.9, 4.0),
    "dkd": (1.0, 1.0, 4.0),
    "lskd": (0.1, 9.0, 2.0),
    "fitnet": (1.0, 100.0, 1.0),
    "at": (1.0, 1000.0, 1.0),
    "rkd": (1.0, 1.0, 1.0),
    "pkt": (1.0, 30000.0, 1.0),
    "sp": (1.0, 3000.0, 1.0),
}


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What to distil and how. `None` means the method's published default (see `_DEFAULTS`)."""

    method: str = "kd"  # one of METHODS, or several joined by '+' (e.g. "kd+at")
    ce_weight: float | None = None  # weight of the hard-label cross-entropy
    weights: tuple[float, ...] | None = None  # lambda_i, one per '+'-joined term
    temperature: float | None = None  # logit methods
    label_smoothing: float = 0.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup_epochs: float = 20.0
    hint_layer: str = "layer2"  # FitNets: the student/teacher feature pair regressed through a connector
    at_layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    at_p: float = 2.0
    embedding: str = "pooled"  # RKD / PKT: the per-example embedding compared
    sp_layers: tuple[str, ...] = ("layer4",)  # SP: the maps whose batch similarities are matched (RepDistiller: the last stage)
    rkd_distance_weight: float = 25.0
    rkd_angle_weight: float = 50.0
    teacher_weights: tuple[float, ...] | None = None  # several teachers (or heads): their weights


@dataclasses.dataclass(frozen=True)
class View:
    """One model's outputs on the batch: logits, named features, connector outputs (student only)."""

    logits: Array | None
    features: Mapping[str, Array]
    projected: Mapping[str, Array] = dataclasses.field(default_factory=dict)


# term(student, teachers, labels, epoch, teacher_weights) -> scalar loss
TermFn = Callable[[View, Sequence[View], Array, Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class Term:
    name: str
    weight: float
    fn: TermFn
    student_features: tuple[str, ...] = ()
    teacher_features: tuple[str, ...] = ()
    hint: str | None = None  # feature regressed through a connector to each teacher's width
    uses_logits: bool = False
    relational: bool = False  # compares examples with each other: sees the global batch (all devices)


@dataclasses.dataclass(frozen=True)
class Objective:
    ce_weight: float
    terms: tuple[Term, ...]
    label_smoothing: float = 0.0
    teacher_weights: tuple[float, ...] | None = None

    @property
    def student_features(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for t in self.terms for f in t.student_features))

    @property
    def teacher_features(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for t in self.terms for f in t.teacher_features))

    @property
    def hints(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.hint for t in self.terms if t.hint))

    @property
    def relational_features(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f for t in self.terms if t.relational for f in t.student_features))

    @property
    def needs_teacher(self) -> bool:
        return bool(self.terms)


def connector_name(feature: str, teacher: int) -> str:
    return f"{feature}_t{teacher}"


def _mean_over_teachers(fn: Callable[[View, View, int], Array]) -> TermFn:
    def term(s: View, ts: Sequence[View], labels: Array, epoch: Array, w: Array) -> Array:
        return sum(w[k] * fn(s, t, k) for k, t in enumerate(ts))

    return term


def _logit_term(cfg: DistillConfig, method: str) -> TermFn:
    temp = cfg.temperature if cfg.temperature is not None else _DEFAULTS[method][2]

    def term(s: View, ts: Sequence[View], labels: Array, epoch: Array, w: Array) -> Array:
        t_logits = [t.logits for t in ts]
        if method == "kd":
            return losses.kd_loss(s.logits, t_logits, temp, w)
        if method == "lskd":
            return losses.lskd_loss(s.logits, t_logits, temp, w)
        warm = losses.dkd_warmup(epoch, cfg.dkd_warmup_epochs)
        return losses.dkd_loss(s.logits, t_logits, labels, cfg.dkd_alpha, cfg.dkd_beta, temp, warm, w)

    return term


def _feature_pair_loss(cfg: DistillConfig, method: str) -> Callable[[View, View, int], Array]:
    """loss(student view, teacher view, teacher index) of one feature method."""
    if method == "fitnet":
        layer = cfg.hint_layer
        return lambda s, t, k: losses.hint_loss(s.projected[connector_name(layer, k)], t.features[layer])
    if method == "at":
        names, p = cfg.at_layers, cfg.at_p
        return lambda s, t, k: sum(losses.at_loss(s.features[n], t.features[n], p) for n in names)
    if method == "sp":
        return lambda s, t, k: sum(losses.sp_loss(s.features[n], t.features[n]) for n in cfg.sp_layers)
    e = cfg.embedding
    if method == "rkd":
        wd, wa = cfg.rkd_distance_weight, cfg.rkd_angle_weight
        return lambda s, t, k: losses.rkd_loss(s.features[e], t.features[e], wd, wa)
    return lambda s, t, k: losses.pkt_loss(s.features[e], t.features[e])


def _logit_or_feature_term(cfg: DistillConfig, m: str, lam: float) -> Term:
    if m in LOGIT_METHODS:
        return Term(m, lam, _logit_term(cfg, m), uses_logits=True)
    fn = _mean_over_teachers(_feature_pair_loss(cfg, m))
    if m == "fitnet":
        return Term(m, lam, fn, (cfg.hint_layer,), (cfg.hint_layer,), hint=cfg.hint_layer)
    if m == "at":
        return Term(m, lam, fn, cfg.at_layers, cfg.at_layers)
    if m == "sp":
        return Term(m, lam, fn, cfg.sp_layers, cfg.sp_layers, relational=True)
    return Term(m, lam, fn, (cfg.embedding,), (cfg.embedding,), relational=True)  # rkd, pkt


def make_objective(cfg: DistillConfig) -> Objective:
    """The loss `ce_weight * CE + sum_i lambda_i l_i` that `cfg.method` names."""
    names = [m.strip() for m in cfg.method.split("+") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown:
        raise ValueError(f"unknown distillation method {cfg.method!r}; choose from {', '.join(METHODS)} (or join with '+')")
    if len(set(names)) != len(names):
        raise ValueError(f"method {cfg.method!r} names a term twice")
    if "ce" in names and len(names) > 1:
        raise ValueError("'ce' (student alone) cannot be combined with distillation terms; use --ce-weight")
    if cfg.weights is not None and len(cfg.weights) != len(names):
        raise ValueError(f"weights {cfg.weights} must give one lambda per term of {cfg.method!r}")
    ce_weight = cfg.ce_weight if cfg.ce_weight is not None else _DEFAULTS[names[0]][0]
    terms: list[Term] = []
    for i, m in enumerate(names):
        if m == "ce":
            continue
        lam = cfg.weights[i] if cfg.weights is not None else _DEFAULTS[m][1]
        terms.append(_logit_or_feature_term(cfg, m, lam))
    return Objective(ce_weight, tuple(terms), cfg.label_smoothing, cfg.teacher_weights)


# ---------------------------------------------------------------------------------------- modules
class Connector(nn.Module):
    """FitNets regressor from the student's width to the teacher's: 1x1 conv + BN (torchdistill's
    and RepDistiller's ConvReg without its ReLU, so negative teacher pre-activations stay reachable);
    Linear + BN for (B, D) embeddings."""

    features: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if x.ndim == 4:
            x = layers.Conv2d(self.features, 1, bias=False, name="conv")(x)
        else:
            x = layers.Linear(self.features, bias=False, name="linear")(x)
        return layers.BatchNorm(axis_name=self.axis_name, name="bn")(x, train)


class Connectors(nn.Module):
    """Named connectors: `specs` = ((name, student feature, teacher channels), ...)."""

    specs: tuple[tuple[str, str, int], ...]
    axis_name: str | None = None

    @nn.compact
    def __call__(self, feats: Mapping[str, Array], train: bool = False) -> dict[str, Array]:
        return {
            name: Connector(c, self.axis_name, name=name)(feats[src], train) for name, src, c in self.specs
        }


class DistillStudent(nn.Module):
    """The student plus its trainable connectors: params = {'student': ..., 'connector': ...}.

    `__call__` is the student alone (evaluation and export use it); `project` runs the connectors
    on the student's features.
    """

    student: nn.Module
    connector: Connectors | None = None

    def __call__(self, x: Array, train: bool = False) -> Any:
        return self.student(x, train=train)

    def project(self, feats: Mapping[str, Array], train: bool = False) -> dict[str, Array]:
        return self.connector(feats, train) if self.connector is not None else {}


class MultiHeadStudent(nn.Module):
    """A backbone (any `models.create(name, num_classes=0)`) with one linear head per teacher/task.

    Returns a tuple of logits, head k sized `head_classes[k]`; the backbone's sown features keep
    their names (e.g. 'layer3', 'pooled').
    """

    backbone: nn.Module
    head_classes: tuple[int, ...]

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, ...]:
        z = self.backbone(x, train=train)
        return tuple(
            layers.Linear(c, name=f"head{k}")(z).astype(jnp.float32) for k, c in enumerate(self.head_classes)
        )


def _require(feats: Mapping[str, Array], names: Sequence[str], who: str) -> None:
    missing = [n for n in names if n not in feats]
    if missing:
        raise ValueError(f"{who} has no feature(s) {missing}; it sows {sorted(feats)}")


# ------------------------------------------------------------------------------------------ state
def model_features(model: nn.Module, variables: Any, x: Array, train: bool = False, **kw: Any) -> tuple[Any, dict[str, Array]]:
    """`models.features` for any module, nested ones (e.g. `MultiHeadStudent`'s backbone) included."""
    out, state = model.apply(variables, x, train=train, mutable=["features"], **kw)
    return out, collect_features(state.get("features", {}))


def feature_shapes(model: nn.Module, variables: Any, image_size: int) -> dict[str, tuple[int, ...]]:
    """{feature name: shape} of a (2, size, size, 3) forward pass, without computing it."""
    x = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    _, feats = jax.eval_shape(lambda v, x: model_features(model, v, x), variables, x)
    return {k: tuple(v.shape) for k, v in feats.items()}


def connector_specs(
    objective: Objective, teachers: Sequence[nn.Module], teacher_vars: Sequence[Any], image_size: int
) -> tuple[tuple[str, str, int], ...]:
    """(name, student feature, teacher channels) for every hint feature and teacher."""
    specs = []
    for k, (t, v) in enumerate(zip(teachers, teacher_vars)):
        if not objective.hints:
            break
        shapes = feature_shapes(t, v, image_size)
        _require(shapes, objective.hints, f"teacher {k} ({type(t).__name__})")
        specs += [(connector_name(h, k), h, shapes[h][-1]) for h in objective.hints]
    return tuple(specs)


def build_student(
    student: nn.Module,
    objective: Objective,
    teachers: Sequence[nn.Module],
    teacher_vars: Sequence[Any],
    image_size: int,
    axis_name: str | None = AXIS,
) -> DistillStudent:
    """The student wrapped with the connectors the objective needs; checks every feature exists."""
    s_vars = models.shapes(student, image_size)
    _require(feature_shapes(student, s_vars, image_size), objective.student_features, "student")
    if objective.teacher_features:
        for k, (t, v) in enumerate(zip(teachers, teacher_vars)):
            _require(feature_shapes(t, v, image_size), objective.teacher_features, f"teacher {k}")
    specs = connector_specs(objective, teachers, teacher_vars, image_size)
    return DistillStudent(student, Connectors(specs, axis_name) if specs else None)


def init_student(module: DistillStudent, student_vars: Mapping[str, Any], image_size: int, rng: jax.Array) -> dict:
    """Variables of a `DistillStudent`: the given student variables plus freshly initialised connectors."""
    variables = {"params": {"student": student_vars["params"]}, "batch_stats": {"student": student_vars.get("batch_stats", {})}}
    if module.connector is None:
        return variables
    feats = feature_shapes(module.student, dict(student_vars), image_size)
    srcs = {src for _, src, _ in module.connector.specs}
    _require(feats, sorted(srcs), "student")
    dummy = {s: jnp.zeros(feats[s], jnp.float32) for s in srcs}
    conn = Connectors(module.connector.specs).init(rng, dummy, train=False)
    variables["params"]["connector"] = conn["params"]
    variables["batch_stats"]["connector"] = conn.get("batch_stats", {})
    return variables


def create_state(
    module: DistillStudent,
    student_vars: Mapping[str, Any],
    tx: optax.GradientTransformation,
    image_size: int,
    seed: int = 0,
    ema_decay: float = 0.0,
) -> TrainState:
    """A TrainState whose params hold the student and its connectors (both train)."""
    variables = init_student(module, student_vars, image_size, jax.random.key(seed + 1))
    return TrainState.create(module.apply, variables, tx, seed=seed, ema_decay=ema_decay)


def student_variables(state_or_vars: TrainState | Mapping[str, Any]) -> dict[str, Any]:
    """The student's own {'params', 'batch_stats'} (connectors dropped), e.g. for `to_torch` export."""
    v = state_or_vars.variables if isinstance(state_or_vars, TrainState) else state_or_vars
    return {"params": v["params"]["student"], "batch_stats": v["batch_stats"].get("student", {})}


# ------------------------------------------------------------------------------------------- step
CACHED_LOGITS = "teacher_logits"


def cached_feature_key(teacher: int, feature: str) -> str:
    """Batch key of a precomputed teacher feature (see `teacher_outputs`)."""
    return f"teacher_features/{teacher}/{feature}"


def _cached_views(objective: Objective, n_teachers: int, batch: Batch) -> list[View] | None:
    """Teacher views from precomputed batch entries, or None if any needed entry is missing."""
    logits = batch.get(CACHED_LOGITS)
    keys = [[cached_feature_key(k, f) for f in objective.teacher_features] for k in range(n_teachers)]
    if logits is None or any(key not in batch for ks in keys for key in ks):
        return None
    logits = logits if logits.ndim == 3 else logits[:, None]  # (B, K, C)
    if logits.shape[1] != n_teachers:
        raise ValueError(f"batch['{CACHED_LOGITS}'] holds {logits.shape[1]} teachers, the objective has {n_teachers}")
    sg = jax.lax.stop_gradient
    return [
        View(sg(logits[:, k]), {f: sg(batch[key]) for f, key in zip(objective.teacher_features, keys[k])})
        for k in range(n_teachers)
    ]


def _teacher_views(objective: Objective, teachers: Sequence[nn.Module], extra: Any, batch: Batch) -> list[View]:
    cached = _cached_views(objective, len(teachers), batch)
    if cached is not None:
        return cached
    if extra is None:
        raise ValueError(
            "the teachers' variables must be passed as the step's `extra` argument (or every teacher output the "
            f"objective needs precomputed in the batch: {CACHED_LOGITS!r} and 'teacher_features/<k>/<name>')"
        )
    teacher_vars = jax.lax.stop_gradient(extra)
    if len(teacher_vars) != len(teachers):
        raise ValueError(f"{len(teachers)} teacher modules but {len(teacher_vars)} teacher variable sets")
    feats_needed = objective.teacher_features
    views = []
    for k, (t, v) in enumerate(zip(teachers, teacher_vars)):
        if feats_needed:
            logits, feats = model_features(t, v, batch["image"], train=False)
            _require(feats, feats_needed, f"teacher {k}")
            feats = {n: jax.lax.stop_gradient(feats[n]) for n in feats_needed}
        else:
            logits, feats = t.apply(v, batch["image"], train=False), {}
        if isinstance(logits, tuple):
            logits = logits[0]
        views.append(View(jax.lax.stop_gradient(logits), feats))
    return views


def _head_label_key(batch: Batch, task: str | None) -> str:
    return f"label/{task}" if task is not None and f"label/{task}" in batch else "label"


def _check_mixable(objective: Objective, batch: Batch) -> None:
    """MixUp / CutMix batches need the teacher live on the mixed images, and a target class per image."""
    if CACHED_LOGITS in batch:
        raise ValueError("a mixed (MixUp / CutMix) batch cannot use cached teacher outputs: they are of the unmixed "
                         "images; run the teacher in the step (cache_teacher false)")
    if any(t.name == "dkd" for t in objective.terms):
        raise ValueError("DKD splits the logits at one target class per image, which a mixed (MixUp / CutMix) "
                         "image does not have; use kd, lskd or a feature method with mixing")


def _gather(feats: Mapping[str, Array], names: Sequence[str], axis_name: str) -> dict[str, Array]:
    """Replace `names` by their concatenation over all devices (differentiable: all_gather's transpose
    sends each device the gradient of its own rows)."""
    out = dict(feats)
    for n in names:
        out[n] = jax.lax.all_gather(feats[n], axis_name, tiled=True)
    return out


def _masked_mean(values: Array, mask: Array, axis_name: str | None) -> Array:
    """This device's share of the *global* mean over masked-in rows, scaled so that the step's
    average over devices is exact even when devices hold different numbers of labelled rows."""
    total = jnp.sum(jnp.where(mask, values, 0.0))
    count = mask.sum().astype(jnp.float32)
    if axis_name is None:
        return total / jnp.maximum(count, 1.0)
    count = jax.lax.psum(count, axis_name)
    return total * jax.lax.psum(1, axis_name) / jnp.maximum(count, 1.0)


def distill_loss(
    objective: Objective,
    teachers: Sequence[nn.Module],
    steps_per_epoch: int = 1,
    tasks: Sequence[str] | None = None,
    axis_name: str | None = AXIS,
) -> LossFn:
    """The `loss_fn` for `jtkd.train.make_train_step`: `extra` is the list of teacher variables.

    One student output: CE on batch['label'] + terms against all teachers. A `MultiHeadStudent`
    (tuple output, one head per teacher): head k gets CE on batch['label/<tasks[k]>'] (or 'label')
    and the logit terms against teacher k alone, weighted by `teacher_weights`; feature terms on
    the shared backbone average over the teachers. The DKD warm-up epoch is step // steps_per_epoch + 1.

    Unlabelled transfer data: rows with label < 0 get no cross-entropy (it averages over the labelled
    rows of the global batch) but every distillation term; DKD's target class is the teacher's
    prediction there. Relational terms (RKD, PKT) compare all pairs of the *global* batch: their
    embeddings are gathered over `axis_name`, so the loss does not depend on the number of devices.
    Teacher outputs precomputed by `teacher_outputs` (no augmentation) replace the teacher passes.

    A batch mixed by `jtkd.mixup` (MixUp / CutMix in the step): teachers and student see the same mixed
    images (Beyer et al. 2022's "function matching" with kd), CE is on the mixed soft targets of rows
    whose partner is labelled too, and accuracies are of the rows' own labels. Cached teacher outputs and
    DKD are refused with mixing.
    """
    n_t = len(teachers)
    tw = objective.teacher_weights
    if tw is not None and len(tw) != n_t:
        raise ValueError(f"{len(tw)} teacher weights for {n_t} teachers")
    weights = np.asarray(tw if tw is not None else [1.0] * n_t, np.float32)
    weights = weights / weights.sum()
    mutable = ["batch_stats"] + (["features"] if objective.student_features else [])

    def loss_fn(params: Any, state: TrainState, batch: Batch, rng: Array, extra: Any) -> tuple[Array, tuple[Any, Metrics]]:
        epoch = state.step // steps_per_epoch + 1
        if mixup.is_mixed(batch):
            _check_mixable(objective, batch)
        t_views = _teacher_views(objective, teachers, extra, batch) if objective.needs_teacher else []

        variables = {"params": params, "batch_stats": state.batch_stats}
        out, mutated = state.apply_fn(variables, batch["image"], train=True, mutable=mutable, rngs={"dropout": rng})
        batch_stats = mutated["batch_stats"]
        feats = collect_features(mutated.get("features", {}))
        _require(feats, objective.student_features, "student")
        projected: dict[str, Array] = {}
        if objective.hints:
            projected, mut2 = state.apply_fn(
                {"params": params, "batch_stats": batch_stats}, {h: feats[h] for h in objective.hints},
                train=True, method="project", mutable=["batch_stats"],
            )
            batch_stats = mut2["batch_stats"]

        heads = out if isinstance(out, tuple) else (out,)
        multi_head = isinstance(out, tuple) and len(heads) > 1
        if multi_head and len(heads) != n_t:
            raise ValueError(f"a multi-head student needs one head per teacher: {len(heads)} heads, {n_t} teachers")
        head_tasks = list(tasks) if tasks is not None else [None] * len(heads)
        w = jnp.asarray(weights)

        metrics: dict[str, Array] = {}
        ce = 0.0
        targets = []
        for k, logits in enumerate(heads):
            if multi_head:
                t_probs = jax.nn.softmax(t_views[k].logits) if t_views else None
            elif t_views:
                t_probs = sum(w[i] * jax.nn.softmax(v.logits) for i, v in enumerate(t_views))
            else:
                t_probs = None
            key = _head_label_key(batch, head_tasks[k])
            y = batch[key].astype(jnp.int32)
            valid = y >= 0
            # unlabelled rows: the teacher's prediction is DKD's target class (a dummy 0 without teachers)
            y = jnp.where(valid, y, t_probs.argmax(-1) if t_probs is not None else 0)
            targets.append(y)
            if mixup.is_mixed(batch):  # CE on the mixed targets of rows whose partner is labelled too
                ce_rows, t = valid & (batch[f"{key}_mix"] >= 0), mixup.targets(batch, logits.shape[-1], key)
            else:
                ce_rows, t = valid, jax.nn.one_hot(y, logits.shape[-1])
            q = optax.smooth_labels(t, objective.label_smoothing)
            ce_k = _masked_mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), q), ce_rows, axis_name)
            ce = ce + (w[k] * ce_k if multi_head else ce_k)
            suffix = f"/{head_tasks[k] or k}" if multi_head else ""
            pred = logits.argmax(-1)
            metrics[f"accuracy{suffix}"] = _masked_mean((pred == y).astype(jnp.float32), valid, axis_name)
            if multi_head:
                metrics[f"ce{suffix}"] = ce_k
            if t_probs is not None:
                t_pred = t_probs.argmax(-1)
                metrics[f"teacher_accuracy{suffix}"] = _masked_mean((t_pred == y).astype(jnp.float32), valid, axis_name)
                metrics[f"agreement{suffix}"] = (t_pred == pred).astype(jnp.float32).mean()
        loss = objective.ce_weight * ce
        metrics["ce"] = ce

        if axis_name is not None and objective.relational_features:
            rel = objective.relational_features
            feats = _gather(feats, rel, axis_name)
            t_views = [dataclasses.replace(v, features=_gather(v.features, rel, axis_name)) for v in t_views]
        for term in objective.terms:
            if term.uses_logits and multi_head:  # head k learns teacher k alone
                value = sum(
                    w[k] * term.fn(View(heads[k], feats, projected), [t_views[k]], targets[k], epoch, jnp.ones((1,)))
                    for k in range(n_t)
                )
            else:
                value = term.fn(View(heads[0], feats, projected), t_views, targets[0], epoch, w)
            metrics[f"loss_{term.name}"] = value
            loss = loss + term.weight * value
        metrics["loss"] = loss
        return loss, (batch_stats, metrics)

    return loss_fn


# ----------------------------------------------------------------------------------------- teachers
def load_teacher(
    spec: str, num_classes: int | None = None, image_size: int | None = None, **model_kw: Any
) -> tuple[nn.Module, dict]:
    """A frozen teacher from 'NAME:PATH' or 'NAME'.

    PATH: a torch checkpoint (.pth/.pt/.bin/.safetensors, loaded weights_only and converted strictly)
    or a directory written by `jtkd.checkpoint.save_variables`. 'NAME' alone downloads torchvision's
    DEFAULT weights (needs internet; offline it fails with a message saying to pass a checkpoint).
    `num_classes`, if given, must match the teacher's classifier: logit distillation needs one label space.
    `image_size`, if given, is the input size it will see (a ViT's positional embeddings are resampled
    for it); the module is built with the builder kwargs the weights imply (ViT image_size, ...).
    """
    from converters import torchvision as tv

    name, _, path = spec.partition(":")
    models.get_spec(name)  # unknown names fail here, listing the supported ones
    if not path:
        variables = tv.convert(name, tv.download_weights(name, "DEFAULT"))
    elif Path(path).is_dir():
        from jtkd import checkpoint

        variables = checkpoint.load_variables(path)
    else:
        variables = tv.convert(name, tv.load_checkpoint(path))
    classes = models.num_classes(name, variables)
    if num_classes is not None and classes and classes != num_classes:
        raise ValueError(
            f"teacher {spec!r} predicts {classes} classes but the data has {num_classes}; logit distillation needs "
            "the same classes (fine-tune the teacher on this data first, or use a feature method)"
        )
    if image_size is not None:
        variables = models.at_size(name, variables, image_size)
    return tv.flax_module(name, variables, **model_kw), variables




def teacher_outputs(
    teachers: Sequence[nn.Module],
    teacher_vars: Sequence[Any],
    images: np.ndarray,
    features: Sequence[str] = (),
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Teacher outputs precomputed once for a fixed (non-augmented) data set, as batch entries:
    'teacher_logits' (N, C) or (N, K, C) for K > 1 teachers, and 'teacher_features/<k>/<name>'.

    Add them to the training arrays and the step skips the teacher passes (pass extra=None).
    """
    fns = [jax.jit(lambda v, x, t=t: model_features(t, v, x, train=False)) for t in teachers]
    chunks: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(images), batch_size):
        x = jnp.asarray(images[i : i + batch_size])
        logits = []
        for k, (f, v) in enumerate(zip(fns, teacher_vars)):
            z, feats = f(v, x)
            logits.append(np.asarray(z[0] if isinstance(z, tuple) else z))
            _require(feats, features, f"teacher {k}")
            for name in features:
                chunks.setdefault(cached_feature_key(k, name), []).append(np.asarray(feats[name]))
        chunks.setdefault(CACHED_LOGITS, []).append(logits[0] if len(logits) == 1 else np.stack(logits, 1))
    return {k: np.concatenate(v) for k, v in chunks.items()}


def teacher_logits(
    teachers: Sequence[nn.Module], teacher_vars: Sequence[Any], images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Cached teacher logits for a fixed (non-augmented) data set: (N, C), or (N, K, C) for K > 1 teachers."""
    return teacher_outputs(teachers, teacher_vars, images, (), batch_size)[CACHED_LOGITS]
