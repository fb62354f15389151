"""Knowledge distillation from a converted PyTorch teacher into a jtkd student.

One run (resumable: rerun the same command and it continues from its last orbax checkpoint):

    python -m experiments.distill --teacher resnet34:teacher.pth --student resnet18 --method dkd \\
        --data digits --image_size 32 --steps 600 --workdir runs/distill/dkd

writes WORKDIR/config.json, metrics.jsonl, metrics.png (tqdm on the terminal), checkpoints/, and
results.json (student and teacher test accuracy) plus student.pth, the trained student exported back
to a torchvision state_dict. Options are the fields of `DistillRun` (dotted or short names, see --help):
--method kd|dkd|fitnet|at|rkd|pkt|sp|lskd|ce (or 'kd+at': CE + sum of lambda_i * term_i), --weights,
--ce_weight, --temperature, --labels_per_class (few labels; the rest of the train split becomes an
unlabelled transfer set that only the distillation terms see; each step takes --batch_size labelled
and --transfer_batch_size transfer rows), --augment, --mixup_alpha / --cutmix_alpha (MixUp / CutMix in the
step, teacher and student on the same mixed images: `--method kd --ce_weight 0 --mixup_alpha 1` is
Beyer et al. 2022's function matching), --teacher a,b (several
teachers: averaged softened distributions), --data digits | tfds:NAME | folder:PATH.

Teachers: NAME:CKPT with a torch state_dict (.pth/.safetensors, loaded weights_only, converted
strictly), NAME:DIR (jtkd variables), or NAME alone for torchvision's DEFAULT weights (needs internet).
Logit methods need a teacher trained on the same classes as --data.

The digits study (offline, CPU, a few minutes): a resnet34 teacher trained in PyTorch on the digits
train split (saved as .pth and converted), distilled into a resnet18 that sees only a few labels per
class, against the same resnet18 trained on those labels alone, over several seeds:

    python -m experiments.distill --table                 # runs/distill/results.{md,json,png}
    python -m experiments.distill --table --quick         # a smoke test in well under a minute of training
    python -m experiments.distill --table --methods ce,kd,at@10,kd+at@0.9/10 --seeds 0,1,2,3,4

(--methods entries: a method, optionally with its own lambdas after '@', '/'-separated.) The teacher
is trained once and kept (runs/distill/teacher_resnet34_16px.pth); finished runs are reused, so an
interrupted table resumes where it stopped. The student is a narrow resnet18 (--student_width 16,
0.7M parameters against the teacher's 21M).

CIFAR-100 with a GPU (the resnet32x4 -> resnet8x4 style of RepDistiller/mdistiller, with torchvision
ResNets): fine-tune the teacher first (e.g. `python -m experiments.finetune --model resnet50 --data
tfds:cifar100 ...` or in PyTorch, saved as a state_dict), then

    python -m experiments.distill --teacher resnet50:runs/cifar100_resnet50/best.pth --student resnet18 \\
        --data tfds:cifar100 --image_size 32 --augment --batch_size 128 --steps 97656 \\
        --optim.optimizer sgd --optim.lr 0.05 --optim.momentum 0.9 --optim.weight_decay 5e-4 \\
        --optim.schedule step --optim.step_boundaries 0.625,0.75,0.875 --method dkd \\
        --dkd_warmup_epochs 20 --eval_every 3906 --checkpoint_every 3906 --workdir runs/c100_dkd

That is RepDistiller's 240 epochs (50k/128 = 390.6 steps per epoch), lr 0.05 decayed x0.1 at epochs
150/180/210; the method defaults are the papers' CIFAR-100 settings (KD: T=4, CE 0.1 / KL 0.9; DKD:
alpha 1, beta 8, T 4, 20 warm-up epochs; FitNets 100 on layer2; AT 1000; RKD 25/50; PKT 30000; LSKD:
T 2, CE 0.1 / 9). Published resnet32x4 -> resnet8x4 numbers for orientation: student alone 72.5,
KD 73.3, DKD 76.3 top-1; expect resnet50 -> resnet18 (ImageNet-style stem at 32x32) to follow the
same ordering with different absolute numbers. --augment uses RandomResizedCrop(scale 0.35-1) + flip
with the teacher run live on each augmented view (use --no-augment and cached teacher outputs for
the fastest runs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import jax
import jax.numpy as jnp
import torch

from jtkd import config as cfglib
from jtkd.xla_flags import use_cpu_flags
from jtkd import data, distill, mixup, models, optim, train
from jtkd.data.folder import FolderOptions
from jtkd.distill import DistillConfig
from jtkd.loop import ArraySource, EvalSource, LoopConfig, Trainer, classification_eval, read_jsonl
from jtkd.optim import OptimConfig

log = logging.getLogger("jtkd.distill")


@dataclasses.dataclass(frozen=True)
class DistillRun:
    """One distillation run, or (table=True) the digits comparison."""

    teacher: tuple[str, ...] = ()  # NAME:CKPT | NAME:DIR | NAME, comma-separated for several teachers
    student: str = "resnet18"  # NAME (random init) or NAME:CKPT (torch weights, new head)
    student_width: int = 0  # ResNets: channels of layer1 (0: torchvision's 64); e.g. 16 = a 16x cheaper narrow student
    data: str = "digits"  # digits | tfds:NAME | folder:PATH (folder: PATH/train, PATH/test sub-folders)
    eval_split: str = "test"
    folder: FolderOptions = dataclasses.field(default_factory=FolderOptions)  # folder data: bad files, empty classes
    image_size: int = 32
    labels_per_class: int = 0  # > 0: few-label regime; the rest of the train split is unlabelled transfer data
    augment: bool = False  # digits: random 2-pixel shifts; tfds/folder: RandomResizedCrop + flip
    crop_scale: tuple[float, float] = (0.35, 1.0)
    # MixUp / CutMix in the step (jtkd.mixup), teacher and student on the same mixed images: the teacher
    # runs live (no cached outputs); with kd and ce_weight 0 this is Beyer et al.'s function matching
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cache_teacher: bool = True  # no augmentation: compute the teacher's outputs once, not every step
    batch_size: int = 64  # labelled rows per step
    transfer_batch_size: int = 0  # with --labels_per_class: unlabelled transfer rows added to each step (0: batch_size)
    eval_batch_size: int = 256
    seed: int = 0
    num_devices: int = 0  # 0: all
    workdir: str = "runs/distill/run"
    export_student: bool = True  # write student.pth (torchvision state_dict) at the end
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    )
    loop: LoopConfig = dataclasses.field(default_factory=lambda: LoopConfig(steps=300, log_every=10, eval_every=100))
    # --table: the digits study
    table: bool = False
    quick: bool = False  # a much smaller --table (tests, smoke runs)
    table_teacher: str = "resnet34"  # trained here in PyTorch when --teacher is not given
    teacher_epochs: int = 8
    torch_threads: int = 1  # PyTorch intra-op threads for the teacher (1 is fastest on small, shared CPUs)
    seeds: tuple[int, ...] = (0, 1, 2)
    # method[@lambda,...]; AT's CIFAR weight 1000 assumes 32x32..8x8 maps: 4x4/2x2 maps need ~1000 * 16/1024
    methods: tuple[str, ...] = ("ce", "kd", "dkd", "at", "at@10", "fitnet", "fitnet@10", "kd+at@0.9/10")

    def validate(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.labels_per_class < 0:
            raise ValueError(f"labels_per_class must be >= 0, got {self.labels_per_class}")
        k = self.loop.accum_steps
        if self.batch_size % k or (self.labels_per_class and (self.transfer_batch_size or self.batch_size) % k):
            # each micro-batch takes every k-th row: labelled and transfer rows split evenly among them
            raise ValueError(f"batch_size ({self.batch_size}) and transfer_batch_size "
                             f"({self.transfer_batch_size or self.batch_size}) must divide by loop.accum_steps={k}")
        mixup.make_batch_transform(self.mixup_alpha, self.cutmix_alpha)  # checks the alphas
        methods = [self.distill.method, *(m.split("@")[0] for m in self.methods if self.table)]
        terms = {t.name for m in methods for t in distill.make_objective(dataclasses.replace(self.distill, method=m)).terms}
        if (self.mixup_alpha or self.cutmix_alpha) and "dkd" in terms:
            raise ValueError("DKD needs one target class per image, which MixUp / CutMix images do not have: "
                             "use kd, lskd or a feature method with --mixup_alpha / --cutmix_alpha")
        kind = self.data.split(":", 1)[0]
        if kind not in ("digits", "tfds", "folder") or (kind != "digits" and ":" not in self.data):
            raise ValueError(f"--data must be digits, tfds:NAME or folder:PATH, got {self.data!r}")
        for spec in (self.student, *(t for group in self.teacher for t in group.split(",") if t)):
            models.check_input_size(spec.partition(":")[0], self.image_size)


# ------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class Split:
    """In-memory preprocessed arrays ('image', 'label', optional cached teacher outputs)."""

    arrays: dict[str, np.ndarray]
    num_classes: int

    @property
    def n(self) -> int:
        return len(self.arrays["label"])


def shift_augment(max_shift: int = 2):
    """Random translations by up to `max_shift` pixels (edge padding): digits' augmentation, numpy on host."""

    def augment(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        x = batch["image"]
        n, h, w, _ = x.shape
        p = max_shift
        padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
        dy, dx = rng.integers(0, 2 * p + 1, n), rng.integers(0, 2 * p + 1, n)
        out = np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
        return {**batch, "image": out}

    return augment


def _materialise(source: Any, size: int, train_split: bool, cfg: DistillRun) -> tuple[np.ndarray, np.ndarray]:
    """Decode and preprocess a random-access source into arrays (EvalTransform: resize + center crop)."""
    tf = data.EvalTransform(size, resize_size=size) if size <= 64 else data.EvalTransform(size)
    images, labels = [], []
    for batch in data.batches(source, cfg.eval_batch_size, transform=tf, train=False):
        keep = batch["mask"].astype(bool)
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
    return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def load_data(cfg: DistillRun) -> tuple[Split, Split, Any]:
    """(train, eval, streaming train source or None). digits is always in memory; tfds/folder are
    materialised without augmentation, or streamed through TrainTransform with --augment."""
    kind, _, arg = cfg.data.partition(":")
    if kind == "digits":
        tr = data.digits("train", image_size=cfg.image_size)
        te = data.digits("test" if cfg.eval_split == "test" else cfg.eval_split, image_size=cfg.image_size)
        return (Split({"image": tr.images, "label": tr.labels.astype(np.int32)}, tr.info.num_classes),
                Split({"image": te.images, "label": te.labels.astype(np.int32)}, te.info.num_classes), None)
    if kind == "tfds":
        src_tr, src_te = data.tfds_source(arg, "train"), data.tfds_source(arg, cfg.eval_split)
    else:
        opts = dataclasses.asdict(cfg.folder)
        src_tr = data.image_folder(Path(arg) / "train", split="train", **opts)
        src_te = data.eval_folder(Path(arg) / cfg.eval_split, src_tr.info.class_names, split=cfg.eval_split, **opts)
    te_x, te_y = _materialise(src_te, cfg.image_size, False, cfg)
    eval_split = Split({"image": te_x, "label": te_y}, src_tr.info.num_classes)
    if cfg.augment:
        if cfg.labels_per_class:
            raise ValueError("--labels_per_class with a streamed (--augment) tfds/folder source is not supported")
        return Split({}, src_tr.info.num_classes), eval_split, src_tr
    tr_x, tr_y = _materialise(src_tr, cfg.image_size, True, cfg)
    return Split({"image": tr_x, "label": tr_y}, src_tr.info.num_classes), eval_split, None


def few_labels(split: Split, per_class: int, seed: int, keep_unlabelled: bool) -> tuple[Split, Split | None]:
    """(labelled, transfer): `per_class` labelled rows per class (drawn with `seed`) and, for
    distillation, every image of the split with label -1 (the unlabelled transfer set that only the
    distillation terms see). The student-alone baseline gets no transfer set."""
    chosen = data.source.few_shot_indices(split.arrays["label"], per_class, seed)
    labelled = Split({k: v[chosen] for k, v in split.arrays.items()}, split.num_classes)
    if not keep_unlabelled:
        return labelled, None
    return labelled, Split({**split.arrays, "label": np.full_like(split.arrays["label"], -1)}, split.num_classes)


class MixedSource:
    """Each step's batch = `labelled(step)` rows followed by `transfer(step)` rows (both step-indexed,
    so the stream stays a pure function of (seed, step) and resumes exactly). Every batch carries the
    same number of labels however large the unlabelled transfer set is."""

    def __init__(self, labelled: ArraySource, transfer: ArraySource) -> None:
        self.labelled, self.transfer = labelled, transfer

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        a, b = self.labelled(step), self.transfer(step)
        missing = set(a) ^ set(b)
        if missing:
            raise ValueError(f"labelled and transfer batches differ in keys {sorted(missing)}")
        return {k: np.concatenate([a[k], b[k]]) for k in a}


# --------------------------------------------------------------------------------------- models
@dataclasses.dataclass(frozen=True)
class Student:
    """A --student NAME[:CKPT] for `num_classes` at `image_size`, its checkpoint read once: it gives the
    module's builder kwargs (e.g. MNASNet's version-1 stem) and every seed's start."""

    name: str
    num_classes: int
    image_size: int
    width: int = 0
    state_dict: Mapping[str, Any] | None = None

    @classmethod
    def load(cls, spec: str, num_classes: int, image_size: int, width: int = 0) -> Student:
        name, _, path = spec.partition(":")
        models.get_spec(name)  # unknown names fail here, listing the supported ones
        if not path:
            return cls(name, num_classes, image_size, width)
        if width:
            raise ValueError("--student_width builds a non-torchvision width: it has no checkpoint to load")
        from converters import torchvision as tv

        return cls(name, num_classes, image_size, width, tv.load_checkpoint(path))

    def _kw(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.state_dict is not None:
            from converters import torchvision as tv

            kw = tv.model_kwargs(self.name, self.state_dict)
            kw.pop("num_classes")
        # no auxiliary classifiers (googlenet, inception_v3): the losses read one output per teacher
        aux = {"aux_logits": False} if models.has_aux(self.name) else {}
        width = {"width": self.width} if self.width else {}
        return {**kw, **models.size_kwargs(self.name, self.image_size), **aux, **width}

    def module(self) -> Any:
        """The student for data-parallel training (BatchNorm statistics synchronised over the mesh)."""
        return models.create(self.name, num_classes=self.num_classes, axis_name=train.AXIS, **self._kw())

    def variables(self, seed: int) -> dict:
        """A random init from `seed`, or the checkpoint converted with a new head from `seed` (its auxiliary
        classifiers left out, as the student has none; a ViT's positional embeddings resampled)."""
        if self.state_dict is None:
            module = models.create(self.name, num_classes=self.num_classes, **self._kw())
            return models.init(module, jax.random.key(seed), self.image_size)
        from converters import torchvision as tv

        v = tv.convert(self.name, self.state_dict, head="reinit", num_classes=self.num_classes,
                       rng=jax.random.key(seed))
        v = models.at_size(self.name, v, self.image_size)
        aux = models.aux_heads(self.name, v["params"])
        return {c: {k: x for k, x in tree.items() if k not in aux} for c, tree in v.items()}


def evaluate_model(module: Any, variables: Any, split: Split, batch_size: int = 256) -> float:
    """Top-1 accuracy of a model in inference mode on an in-memory split."""
    fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
    correct = 0
    for i in range(0, split.n, batch_size):
        logits = np.asarray(fn(variables, jnp.asarray(split.arrays["image"][i : i + batch_size])))
        logits = logits[0] if isinstance(logits, tuple) else logits
        correct += int((logits.argmax(-1) == split.arrays["label"][i : i + batch_size]).sum())
    return correct / split.n


@dataclasses.dataclass
class Teachers:
    specs: tuple[str, ...]
    modules: list[Any]
    variables: list[Any]


def load_teachers(cfg: DistillRun, num_classes: int, objective: distill.Objective) -> Teachers:
    if not cfg.teacher:
        raise ValueError("--teacher NAME[:CKPT] is required for distillation (or use --table / --method ce)")
    needs_classes = any(t.uses_logits for t in objective.terms)
    mods, vars_ = [], []
    for spec in cfg.teacher:
        m, v = distill.load_teacher(spec, num_classes if needs_classes else None, cfg.image_size)
        mods.append(m)
        vars_.append(v)
    return Teachers(tuple(cfg.teacher), mods, vars_)


# ------------------------------------------------------------------------------------------ a run
class Distiller:
    """Compiled once per (method, model, data shapes); `run(seed)` trains one student."""

    def __init__(
        self,
        cfg: DistillRun,
        train_split: Split,
        eval_split: Split,
        teachers: Teachers | None,
        stream: Any = None,
        transfer: Split | None = None,
    ) -> None:
        self.cfg, self.eval_split, self.teachers, self.stream = cfg, eval_split, teachers, stream
        self.mesh = train.make_mesh(cfg.num_devices or None)
        rows = cfg.batch_size + ((cfg.transfer_batch_size or cfg.batch_size) if transfer is not None else 0)
        what = "batch_size + transfer_batch_size" if transfer is not None else "batch_size"
        train.check_batch_size(self.mesh, rows, cfg.loop.accum_steps, what)
        self.objective = distill.make_objective(cfg.distill)
        self.num_classes = eval_split.num_classes
        t_mods = teachers.modules if (teachers and self.objective.needs_teacher) else []
        t_vars = teachers.variables if (teachers and self.objective.needs_teacher) else []
        if self.objective.needs_teacher and not t_mods:
            raise ValueError(f"method {cfg.distill.method!r} needs a teacher")
        self.t_mods, self.t_vars = t_mods, t_vars
        mix = mixup.make_batch_transform(cfg.mixup_alpha, cfg.cutmix_alpha, axis_name=train.AXIS)
        self.cached = bool(t_mods) and cfg.cache_teacher and not cfg.augment and stream is None and mix is None
        self.train_split, self.transfer = self._with_teacher(train_split), self._with_teacher(transfer)
        n_train = (self.transfer or self.train_split).n if stream is None else len(stream)
        self.steps_per_epoch = max(1, math.floor(n_train / cfg.batch_size))
        self.student_spec = Student.load(cfg.student, self.num_classes, cfg.image_size, cfg.student_width)
        self.student = distill.build_student(self.student_spec.module(), self.objective, t_mods, t_vars, cfg.image_size)
        self.schedule = optim.make_schedule(cfg.optim, cfg.loop.steps)
        loss_fn = distill.distill_loss(self.objective, t_mods, steps_per_epoch=self.steps_per_epoch)
        self.trainer = Trainer(
            self.mesh, loss_fn, classification_eval(), config=cfg.loop, schedule=self.schedule, batch_transform=mix
        )

    def _with_teacher(self, split: Split | None, previous: Split | None = None) -> Split | None:
        """`split` plus the teacher's precomputed outputs (no augmentation: they never change);
        reused from `previous` when the images are the same."""
        if split is None or not self.cached:
            return split
        if previous is not None and np.array_equal(split.arrays["image"], previous.arrays["image"]):
            outs = {k: v for k, v in previous.arrays.items() if k.startswith("teacher_")}
        else:
            outs = distill.teacher_outputs(self.t_mods, self.t_vars, split.arrays["image"], self.objective.teacher_features)
        return Split({**split.arrays, **outs}, split.num_classes)

    def set_split(self, split: Split, transfer: Split | None = None) -> None:
        """Another seed's data (same shapes: the compiled step is reused)."""
        self.train_split = self._with_teacher(split, self.train_split)
        self.transfer = self._with_teacher(transfer, self.transfer)

    def data(self, seed: int) -> Any:
        cfg = self.cfg
        if self.stream is not None:
            tf = data.TrainTransform(cfg.image_size, scale=cfg.crop_scale)
            return data.batches(self.stream, cfg.batch_size, transform=tf, train=True, seed=seed)
        augment = shift_augment(2) if cfg.augment else None
        labelled = ArraySource(self.train_split.arrays, cfg.batch_size, seed=seed, augment=augment)
        if self.transfer is None:
            return labelled
        tb = cfg.transfer_batch_size or cfg.batch_size
        return MixedSource(labelled, ArraySource(self.transfer.arrays, tb, seed=seed + 7919, augment=augment))

    def run(self, seed: int, workdir: str | Path, desc: str = "distill", label: str | None = None) -> dict[str, Any]:
        cfg = self.cfg
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        s_vars = self.student_spec.variables(seed)
        variables = distill.init_student(self.student, s_vars, cfg.image_size, jax.random.key(seed + 1))
        tx = optim.make_optimizer(cfg.optim, variables["params"], total_steps=cfg.loop.steps)
        state = train.TrainState.create(self.student.apply, variables, tx, seed=seed, ema_decay=cfg.optim.ema_decay)
        state = train.replicate(self.mesh, state)
        extra = None if (self.cached or not self.t_mods) else train.replicate(self.mesh, self.t_vars)
        eval_data = EvalSource(self.eval_split.arrays, cfg.eval_batch_size)
        t0 = time.perf_counter()
        run_cfg = dataclasses.replace(cfg, seed=seed, workdir=str(workdir))
        state, _ = self.trainer.fit(state, self.data(seed), eval_data, workdir=workdir, extra=extra, desc=desc,
                                    config=run_cfg)
        final = self.trainer.evaluate(state, eval_data)
        ema_state = state.averaged()
        if ema_state is not None:  # --ema_decay: the student's averaged weights and statistics too
            final.update(self.trainer.evaluate(ema_state, eval_data, prefix="eval_ema/"))
        result = {
            "method": label or cfg.distill.method,
            "weights": list(cfg.distill.weights) if cfg.distill.weights else None,
            "seed": seed,
            "student": cfg.student + (f" (width {cfg.student_width})" if cfg.student_width else ""),
            "student_params": int(sum(np.size(p) for p in jax.tree.leaves(variables["params"].get("student", {})))),
            "teachers": list(self.teachers.specs) if self.teachers else [],
            "accuracy": final["eval/accuracy"],
            "eval_loss": final["eval/loss"],
            **({"accuracy_ema": final["eval_ema/accuracy"]} if ema_state is not None else {}),
            "steps": cfg.loop.steps,
            "labelled_examples": self.train_split.n if self.stream is None else len(self.stream),
            "transfer_examples": self.transfer.n if self.transfer is not None else 0,
            "seconds": time.perf_counter() - t0,
        }
        (workdir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        if cfg.export_student and not cfg.student_width:
            from converters.torchvision import to_torch

            for name, st in (("student", state), ("student_ema", ema_state)):
                if st is not None:
                    sd = to_torch(self.student_spec.name, jax.device_get(distill.student_variables(st)))
                    torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()}, workdir / f"{name}.pth")
        return result


def run_single(cfg: DistillRun) -> dict[str, Any]:
    train_split, eval_split, stream = load_data(cfg)
    objective = distill.make_objective(cfg.distill)
    teachers = load_teachers(cfg, eval_split.num_classes, objective) if objective.needs_teacher else None
    if cfg.labels_per_class:
        train_split, transfer = few_labels(train_split, cfg.labels_per_class, cfg.seed, objective.needs_teacher)
    else:
        transfer = None
    d = Distiller(cfg, train_split, eval_split, teachers, stream, transfer)
    result = d.run(cfg.seed, cfg.workdir, desc=cfg.distill.method)
    if teachers:
        result["teacher_accuracy"] = [evaluate_model(m, v, eval_split) for m, v in zip(teachers.modules, teachers.variables)]
        (Path(cfg.workdir) / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s", json.dumps(result))
    return result


# ------------------------------------------------------------------------------- torch teacher
def train_torch_teacher(
    name: str, train_split: Split, eval_split: Split, path: Path, epochs: int, seed: int = 0, batch_size: int = 64,
    threads: int = 1,
) -> dict[str, float]:
    """Train torchvision `name` on in-memory data with PyTorch (AdamW, one-cycle, shift augmentation) and
    save its state_dict: the 'teacher from somewhere else' a user brings."""
    import torchvision
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    torch.set_num_threads(threads)  # small convolutions: extra threads mostly wait on each other
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = torchvision.models.get_model(name, num_classes=train_split.num_classes)
    x = torch.from_numpy(train_split.arrays["image"].transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(train_split.arrays["label"].astype(np.int64))
    steps = epochs * (len(y) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.2)
    aug = shift_augment(2)
    model.train()
    bar = tqdm(total=steps, desc=f"torch teacher {name}", leave=False)
    step = 0
    for _ in range(epochs):
        perm = rng.permutation(len(y))
        for i in range(len(y) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb = aug({"image": x[idx].numpy().transpose(0, 2, 3, 1)}, rng)["image"]
            xb = torch.from_numpy(np.ascontiguousarray(xb.transpose(0, 3, 1, 2)))
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(eval_split.arrays["image"].transpose(0, 3, 1, 2).copy())).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    acc = float((logits.argmax(-1) == eval_split.arrays["label"]).mean())
    np.save(path.with_suffix(".eval_logits.npy"), logits)  # for the conversion check
    info = {"torch_accuracy": acc, "epochs": epochs, "seconds": time.perf_counter() - t0}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# --------------------------------------------------------------------------------------- table
def method_config(base: DistillConfig, entry: str) -> DistillConfig:
    """A --methods entry: 'kd', 'kd+at', or with its own lambdas after "@" ("at@10", "kd+at@0.9/10")."""
    method, _, weights = entry.partition("@")
    return dataclasses.replace(base, method=method, weights=tuple(float(w) for w in weights.split("/")) if weights else None)


def quick_config(cfg: DistillRun) -> DistillRun:
    return dataclasses.replace(
        cfg,
        batch_size=32,
        teacher_epochs=2,
        table_teacher="resnet18",
        seeds=cfg.seeds[:1],
        methods=("ce", "kd", "at"),
        loop=dataclasses.replace(cfg.loop, steps=6, log_every=3, eval_every=0, progress=False),
    )


def table_defaults(cfg: DistillRun) -> DistillRun:
    """The digits study's settings where the command line left the single-run defaults."""
    base = DistillRun()
    pick = lambda value, default, table_value: table_value if value == default else value
    loop = dataclasses.replace(
        cfg.loop,
        steps=pick(cfg.loop.steps, base.loop.steps, 150),
        eval_every=pick(cfg.loop.eval_every, base.loop.eval_every, 50),
        best_metric="",  # no best-model export per run: the table keeps metrics, not weights
    )
    # 150 steps are ~7 epochs of the 1348-image transfer set: DKD's ramp must finish well before that
    dcfg = dataclasses.replace(
        cfg.distill, dkd_warmup_epochs=pick(cfg.distill.dkd_warmup_epochs, base.distill.dkd_warmup_epochs, 2.0)
    )
    return dataclasses.replace(
        cfg,
        labels_per_class=cfg.labels_per_class or 5,
        student_width=cfg.student_width or 16,  # a narrow resnet18: 0.7M parameters against the teacher's 21M
        image_size=pick(cfg.image_size, base.image_size, 16),  # the scans are 8x8: 16 px loses nothing
        workdir=pick(cfg.workdir, base.workdir, "runs/distill"),
        export_student=False,
        loop=loop,
        distill=dcfg,
    )


def run_table(cfg: DistillRun) -> dict[str, Any]:
    cfg = table_defaults(cfg)
    if cfg.quick:
        cfg = quick_config(cfg)
    root = Path(cfg.workdir)
    root.mkdir(parents=True, exist_ok=True)
    full_train, eval_split, _ = load_data(dataclasses.replace(cfg, data="digits"))
    t0 = time.perf_counter()

    teacher_info: dict[str, Any] = {}
    specs = cfg.teacher
    if not specs:
        path = root / f"teacher_{cfg.table_teacher}_{cfg.image_size}px.pth"
        if not path.exists():
            train_torch_teacher(cfg.table_teacher, full_train, eval_split, path, cfg.teacher_epochs, threads=cfg.torch_threads)
        if path.with_suffix(".json").exists():
            teacher_info.update(json.loads(path.with_suffix(".json").read_text()))
        specs = (f"{cfg.table_teacher}:{path}",)
    cfg = dataclasses.replace(cfg, teacher=specs)
    teachers = load_teachers(cfg, eval_split.num_classes, distill.make_objective(DistillConfig("kd")))
    teacher_info["jax_accuracy"] = [evaluate_model(m, v, eval_split) for m, v in zip(teachers.modules, teachers.variables)]
    torch_logits = Path(specs[0].partition(":")[2]).with_suffix(".eval_logits.npy")
    if torch_logits.exists():  # the converted teacher computes what the torch one did
        fn = jax.jit(lambda v, x: teachers.modules[0].apply(v, x, train=False))
        with jax.default_matmul_precision("highest"):
            ours = np.asarray(fn(teachers.variables[0], jnp.asarray(eval_split.arrays["image"])))
        teacher_info["max_abs_logit_diff_vs_torch"] = float(np.abs(ours - np.load(torch_logits)).max())
    teacher_info["spec"] = list(specs)

    runs: list[dict[str, Any]] = []
    for method in cfg.methods:
        mcfg = dataclasses.replace(cfg, distill=method_config(cfg.distill, method))
        objective = distill.make_objective(mcfg.distill)
        d = None
        for seed in cfg.seeds:
            split, transfer = few_labels(full_train, cfg.labels_per_class, seed, objective.needs_teacher)
            run_dir = root / _dirname(method) / f"seed{seed}"
            if (run_dir / "results.json").exists():  # the table resumes run by run
                runs.append(json.loads((run_dir / "results.json").read_text()))
                continue
            if d is None:
                d = Distiller(mcfg, split, eval_split, teachers if objective.needs_teacher else None, transfer=transfer)
            else:  # same shapes: reuse the compiled step, swap the data
                d.set_split(split, transfer)
            runs.append(d.run(seed, run_dir, desc=f"{method} seed {seed}", label=method))
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # finished: keep metrics, not 90 MB of state
            log.info("%s seed %d: %.4f", method, seed, runs[-1]["accuracy"])
    summary = summarise(runs, cfg, teacher_info, time.perf_counter() - t0)
    write_table(summary, root)
    return summary


def summarise(runs: list[dict[str, Any]], cfg: DistillRun, teacher: dict[str, Any], seconds: float) -> dict[str, Any]:
    rows = []
    for method in cfg.methods:
        accs = [r["accuracy"] for r in runs if r["method"] == method]
        rows.append({
            "method": method,
            "mean": float(np.mean(accs)),
            "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            "min": float(np.min(accs)),
            "max": float(np.max(accs)),
            "per_seed": accs,
        })
    return {
        "setting": {
            "data": "digits (scikit-learn), stratified 75/25 split",
            "image_size": cfg.image_size,
            "student": cfg.student + (f" width {cfg.student_width}" if cfg.student_width else ""),
            "student_params": runs[0].get("student_params", 0) if runs else 0,
            "labels_per_class": cfg.labels_per_class,
            "steps": cfg.loop.steps,
            "batch_size": cfg.batch_size,
            "optim": dataclasses.asdict(cfg.optim),
            "seeds": list(cfg.seeds),
            "distill": dataclasses.asdict(cfg.distill),
        },
        "teacher": teacher,
        "rows": rows,
        "runs": runs,
        "seconds": seconds,
        "run_seconds": float(sum(r.get("seconds", 0.0) for r in runs)),
    }


_LABELS = {"ce": "student alone (CE on the labelled rows)", "kd": "KD (Hinton)", "dkd": "DKD", "at": "AT",
           "fitnet": "FitNets", "rkd": "RKD", "pkt": "PKT", "lskd": "KD + logit standardisation"}


def _dirname(entry: str) -> str:
    return entry.replace("/", "_")


def _label(entry: str) -> str:
    method, _, weights = entry.partition("@")
    names = " + ".join(_LABELS.get(m, m) for m in method.split("+"))
    if weights:
        lam = [f"λ={w}" for w in weights.split("/")]
    else:  # the method's published default
        lam = [f"λ={distill._DEFAULTS[m][1]:g} default" for m in method.split("+") if m != "ce"]
    return names + (f" ({', '.join(lam)})" if lam else "")


def write_table(summary: dict[str, Any], root: Path) -> None:
    s = summary["setting"]
    t = summary["teacher"]
    lines = [
        "# Distillation on digits",
        "",
        f"Teacher {', '.join(t['spec'])} (trained in PyTorch, converted): test accuracy "
        f"{', '.join(f'{a:.4f}' for a in t['jax_accuracy'])} in JAX"
        + (f", {t['torch_accuracy']:.4f} in torch" if "torch_accuracy" in t else "")
        + (f", max |logit difference| {t['max_abs_logit_diff_vs_torch']:.2e}" if "max_abs_logit_diff_vs_torch" in t else "")
        + ".",
        (
            f"Student {s['student']} ({s['student_params'] / 1e6:.2f}M parameters) from scratch, "
            f"{s['labels_per_class']} labels per class; distillation runs also see the rest of the train split "
            f"without labels. {s['image_size']}x{s['image_size']} images, {s['steps']} steps of batch "
            f"{s['batch_size']}, seeds {s['seeds']}. Test accuracy (449 images):"
        ),
        "",
        "| method | mean | std | min | max | per seed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["rows"]:
        lines.append(f"| {_label(r['method'])} | {r['mean']:.4f} | {r['std']:.4f} | {r['min']:.4f} | "
                     f"{r['max']:.4f} | {', '.join(f'{a:.4f}' for a in r['per_seed'])} |")
    lines += [
        "",
        (f"Training time of the {len(summary['runs'])} runs (compilation included): {summary.get('run_seconds', 0):.0f} s"
         + (f"; teacher training {t['seconds']:.0f} s" if "seconds" in t else "")
         + f". This invocation: {summary['seconds']:.0f} s (finished runs found in the directory are reused)."),
        "",
        ("How the runs are built: the student alone trains on its labelled rows only; a distillation step takes "
        f"{s['batch_size']} labelled rows (cross-entropy) plus {s['batch_size']} rows of the unlabelled transfer set "
        "(every train image; distillation terms only). With labelled and unlabelled rows drawn from one pool, a batch "
        "held ~2 labels and the feature methods, which carry no class information, fell below the student alone. "
        "AT is a mean over the H*W positions of each map, so its CIFAR weight 1000 (32x32..8x8 maps) is ~64x too "
        "strong on these 4x4/2x2 maps: λ=10 is the same balance (1000 * 16/1024 ≈ 16)."),
        "",
    ]
    (root / "results.md").write_text("\n".join(lines))
    (root / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_table(summary, root / "results.png")


def plot_table(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = np.arange(len(rows))
    ax1.bar(xs, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color="#7aa6c2")
    for i, r in enumerate(rows):
        ax1.scatter([i] * len(r["per_seed"]), r["per_seed"], color="k", s=10, zorder=3)
    for a in summary["teacher"]["jax_accuracy"]:
        ax1.axhline(a, color="r", ls="--", lw=1, label="teacher")
    ax1.set_xticks(xs, [r["method"] for r in rows], rotation=30, ha="right")
    lo = min(min(r["per_seed"]) for r in rows)
    ax1.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax1.set_ylabel("test accuracy")
    ax1.set_title("digits: student accuracy (mean ± std over seeds)")
    ax1.legend(fontsize=8)
    root = path.parent
    for r in rows:
        rows_ = read_jsonl(root / _dirname(r["method"]) / f"seed{summary['setting']['seeds'][0]}" / "metrics.jsonl")
        pts = [(x["step"], x["eval/accuracy"]) for x in rows_ if "eval/accuracy" in x]
        if pts:
            ax2.plot(*zip(*pts), marker="o", ms=3, label=r["method"])
    ax2.set_xlabel("step")
    ax2.set_ylabel("test accuracy")
    ax2.set_title(f"eval accuracy during training (seed {summary['setting']['seeds'][0]})")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = cfglib.parse_cli(DistillRun(), list(sys.argv[1:] if argv is None else argv))
    if cfg.table:
        summary = run_table(cfg)
        print((Path(table_defaults(cfg).workdir) / "results.md").read_text())
        return summary
    return run_single(cfg)


if __name__ == "__main__":
    use_cpu_flags()  # this process owns XLA: its measured-best CPU flags (no-op on GPU/TPU)
    main()
