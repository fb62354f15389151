"""Fine-tune a torchvision model in JAX on your data: the command-line front end of `jtkd.finetune`.

    # ImageNet weights from torchvision (needs internet once), a tfds data set, partial freezing:
    python -m experiments.finetune --model resnet50 --weights DEFAULT --data tfds:oxford_flowers102 \\
        --train_split train --eval_split validation --mode partial --freeze_stages 2 --lr 0.01 \\
        --steps 3000 --batch_size 128 --image_size 224 --workdir runs/flowers
    # your own torch checkpoint (.pth state_dict or .safetensors) and an image folder:
    python -m experiments.finetune --model resnet18 --checkpoint my_resnet18.pth \\
        --data folder:/data/pets/train --eval_data folder:/data/pets/val --mode full --optimizer adamw --lr 3e-4
    # then full fine-tuning from that run's Flax variables, its trained classifier kept:
    python -m experiments.finetune --model resnet18 --checkpoint runs/finetune/final --head_init keep \
        --data folder:/data/pets/train --eval_data folder:/data/pets/val --mode full --workdir runs/ft2
    # offline smoke run on scikit-learn digits:
    python -m experiments.finetune --data digits --mode scratch --quick --workdir /tmp/ft

Every option of `FinetuneConfig` (mode, optimizer, schedule, layer_decay, label_smoothing, dtype,
checkpoint_every, ...) is a flag; `--help` lists them with their values. Re-running the same command
resumes from the newest checkpoint in --workdir. Outputs in --workdir: config.json, metrics.jsonl,
metrics.png, checkpoints/{state,best}/, final/ (orbax variables), final.pth (a torch state_dict of the
fine-tuned model, loadable with torchvision's `load_state_dict(strict=True)`), results.json.

Data: `tfds:NAME` (prepared in --tfds_data_dir, or --download), `folder:PATH` (PATH/<class>/<images>),
or `digits` (offline; --digits_classes picks the classes). An evaluation folder is labelled with the
training classes' names (a class folder the training data lacks is an error, not a shifted label);
`--folder.on_bad skip`, `--folder.on_empty drop|keep` and `--folder.validate full` set how bad files
and empty classes are treated (`jtkd.data.folder`). Training images get RandomResizedCrop +
flip (--no-augment: the eval transform), evaluation images Resize + CenterCrop (torchvision's recipe).

Multi-host (one process per host; see `jtkd.loop` for what each process reads):

    python -m experiments.finetune ... --coordinator 10.0.0.1:1234 --num_processes 4 --process_id $RANK

On TPU pods or SLURM, `--distributed` alone calls `jax.distributed.initialize()` with auto-detection.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import torch

from jtkd import config as jconfig
from jtkd.data.folder import FolderOptions
from jtkd.xla_flags import use_cpu_flags
from jtkd.finetune import FinetuneConfig


@dataclasses.dataclass(frozen=True)
class FinetuneJob:
    data: str = "digits"  # tfds:NAME | folder:PATH | digits
    eval_data: str = ""  # default: the eval split of the same tfds set / digits test split / none for folders
    train_split: str = "train"
    eval_split: str = "test"
    tfds_data_dir: str = ""
    download: bool = False  # let tfds download and prepare the data set (needs internet)
    checkpoint: str = ""  # torch state_dict (.pth/.pt/.bin/.safetensors), or orbax variables (a directory)
    weights: str = ""  # torchvision weights name (DEFAULT, IMAGENET1K_V2, ...): downloaded through torchvision
    digits_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    labels_per_class: int = 0  # digits: few-shot subset of the train split (0: all)
    augment: bool = True
    random_erase: float = 0.0  # RandomErasing probability after the other augmentation (torchvision's recipes: 0.1)
    num_workers: int = 8  # image decoding/augmentation threads
    folder: FolderOptions = dataclasses.field(default_factory=FolderOptions)  # bad files, empty classes
    export_torch: bool = True  # write final.pth
    quick: bool = False  # tiny run (steps=3, 32 px or the model's smallest size, small batches, few examples)
    distributed: bool = False  # jax.distributed.initialize() (auto-detected cluster)
    coordinator: str = ""  # host:port of process 0 (explicit multi-host launch)
    num_processes: int = 1
    process_id: int = 0
    finetune: FinetuneConfig = dataclasses.field(default_factory=lambda: FinetuneConfig(workdir="runs/finetune"))

    def validate(self) -> None:
        if self.checkpoint and self.weights:
            raise ValueError("pass --checkpoint or --weights, not both")
        if not 0 <= self.random_erase <= 1:
            raise ValueError(f"random_erase is a probability in [0, 1], got {self.random_erase}")
        if self.random_erase and not self.augment:
            raise ValueError("random_erase is augmentation, which --no-augment turns off")
        kind = self.data.split(":", 1)[0]
        if kind not in ("tfds", "folder", "digits"):
            raise ValueError(f"--data must be tfds:NAME, folder:PATH or digits; got {self.data!r}")
        if not self.finetune.workdir:
            raise ValueError("--workdir is required")

    def quick_version(self) -> FinetuneJob:
        from jtkd import models

        ft = self.finetune
        ft = dataclasses.replace(
            ft,
            image_size=models.smallest_size(ft.model, 32),  # 32 px, or the model's smallest above (inception: 75)
            batch_size=8,
            eval_batch_size=32,
            loop=dataclasses.replace(ft.loop, steps=3, log_every=1, eval_every=3, checkpoint_every=0, progress=False),
            optim=dataclasses.replace(ft.optim, warmup_steps=1),
        )
        return dataclasses.replace(self, finetune=ft, labels_per_class=self.labels_per_class or 4, num_workers=2)


# ------------------------------------------------------------------------------------------ data
class _Reiterable:
    def __init__(self, make):
        self.make = make

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.make())


def _source(spec: str, split: str, job: FinetuneJob, seed: int, train: bool, classes: tuple[str, ...] = ()):
    """A data source; `classes` (the training class names) label an evaluation folder."""
    from jtkd import data

    kind, _, arg = spec.partition(":")
    if kind == "digits":
        few = job.labels_per_class if (train and job.labels_per_class) else None
        return data.digits(
            split, classes=job.digits_classes, labels_per_class=few, image_size=job.finetune.image_size, seed=seed
        )
    if kind == "tfds":
        return data.tfds_source(arg, split, data_dir=job.tfds_data_dir or None, download=job.download)
    if kind == "folder":
        opts = dict(dataclasses.asdict(job.folder), num_workers=job.num_workers, split=split)
        return data.eval_folder(arg, classes, **opts) if classes else data.image_folder(arg, **opts)
    raise ValueError(f"unknown data spec {spec!r}")


def load_data(job: FinetuneJob, seed: int):
    """(train source, eval source or None, num_classes)."""
    train_src = _source(job.data, job.train_split, job, seed, train=True)
    eval_spec = job.eval_data or (job.data if not job.data.startswith("folder:") else "")
    names = train_src.info.class_names
    eval_src = _source(eval_spec, job.eval_split, job, seed, train=False, classes=names) if eval_spec else None
    if eval_src is not None and tuple(eval_src.info.class_names) != tuple(names):
        # labels pair up by position: different names would be scored against the wrong outputs
        theirs = list(eval_src.info.class_names)
        raise ValueError(f"train data's classes {list(names)} differ from eval data's {theirs}")
    return train_src, eval_src, train_src.info.num_classes


def _in_memory(src) -> bool:
    return hasattr(src, "images") and hasattr(src, "labels")


def _pipelines(job: FinetuneJob, train_src, eval_src, seed: int):
    """Train data as `step -> batch` (exact resume) and re-iterable eval batches."""
    from jtkd import data
    from jtkd.loop import ArraySource, EvalSource, Resumable

    ft = job.finetune
    if _in_memory(train_src):  # digits: preprocessed arrays
        from experiments.transfer import translate

        augment = translate(max(ft.image_size // 10, 1)) if job.augment else None
        if job.random_erase:
            shift, erase = augment, data.RandomErasing(job.random_erase)
            augment = lambda batch, rng: erase.on_batch(shift(batch, rng), rng)  # noqa: E731
        tr = ArraySource({"image": train_src.images, "label": train_src.labels}, ft.batch_size, seed=seed, augment=augment)
        ev = (
            EvalSource({"image": eval_src.images, "label": eval_src.labels}, ft.eval_batch_size)
            if eval_src is not None
            else None
        )
        return tr, ev
    size = ft.image_size
    train_tf = data.TrainTransform(size, erase_prob=job.random_erase) if job.augment else data.EvalTransform(size)
    tr = Resumable(
        lambda start: data.batches(
            train_src,
            ft.batch_size,
            transform=train_tf,
            train=True,
            seed=seed,
            start_step=start,
            num_workers=job.num_workers,
        )
    )
    ev = None
    if eval_src is not None:
        ev = _Reiterable(
            lambda: data.batches(
                eval_src,
                ft.eval_batch_size,
                transform=data.EvalTransform(size),
                train=False,
                num_workers=job.num_workers,
            )
        )
    return tr, ev


def _eval_batches(job: FinetuneJob, src):
    """Un-augmented batches of a whole source (for cached linear-probe features)."""
    from jtkd import data

    if src is None:
        return None
    if _in_memory(src):
        return {"image": src.images, "label": src.labels}
    return data.batches(
        src,
        job.finetune.eval_batch_size,
        transform=data.EvalTransform(job.finetune.image_size),
        train=False,
        num_workers=job.num_workers,
    )


# ------------------------------------------------------------------------------------------- run
def _state_dict(job: FinetuneJob):
    from converters import torchvision as tvc

    if job.checkpoint and Path(job.checkpoint).is_dir():
        # Flax variables (`python -m converters ... --out`'s variables/, a run's final/): through their
        # torch state_dict, so the same strict conversion and head replacement apply
        from jtkd.checkpoint import load_variables

        return tvc.to_torch(job.finetune.model, load_variables(job.checkpoint))
    if job.checkpoint:
        return tvc.load_checkpoint(job.checkpoint)
    if job.weights:
        return tvc.download_weights(job.finetune.model, job.weights)
    return None


def run(job: FinetuneJob) -> dict[str, Any]:
    job.validate()
    if job.quick:
        job = job.quick_version()
    import jax

    if job.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only used by the CPU backend
        jax.distributed.initialize(
            coordinator_address=job.coordinator, num_processes=job.num_processes, process_id=job.process_id
        )
    elif job.distributed:
        jax.distributed.initialize()

    from jtkd import checkpoint, finetune, train
    from jtkd.loop import ArraySource, EvalSource, _info, setup_logging

    setup_logging()
    ft = job.finetune
    workdir = Path(ft.workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    mesh = train.make_mesh(ft.num_devices or None)
    train_src, eval_src, num_classes = load_data(job, ft.seed)
    _info(
        f"data: {job.data} ({len(train_src)} train examples, {num_classes} classes), "
        f"eval {len(eval_src) if eval_src is not None else 0}; "
        f"{mesh.devices.size} devices, {jax.process_count()} process(es)"
    )

    state_dict = _state_dict(job)
    if state_dict is None and ft.mode != "scratch":
        raise SystemExit(
            f"--mode {ft.mode} fine-tunes pretrained weights: pass --checkpoint PATH or --weights DEFAULT "
            "(or use --mode scratch)"
        )
    variables = finetune.initial_variables(ft, num_classes, state_dict)
    del state_dict
    evaluator = finetune.Evaluator(ft.model, num_classes, mesh, ft.eval_batch_size, ft.compute_dtype, variables)
    tuner = finetune.Finetuner(ft, variables, num_classes, mesh, evaluator)
    n_train, n_total = _count(tuner, variables)
    _info(f"{ft.model} mode={ft.mode}: {n_train:,} of {n_total:,} parameters train, bn={ft.bn_mode}, dtype={ft.dtype}")

    if tuner.probe:  # cached features: the backbone runs once over each split
        feats = tuner.features(variables, _eval_batches(job, train_src), "train features")
        ev_feats = _eval_batches(job, eval_src)
        ev_feats = tuner.features(variables, ev_feats, "eval features") if ev_feats is not None else None
        tr = ArraySource(feats, ft.batch_size, seed=ft.seed)
        ev = (
            EvalSource(ev_feats, ft.eval_batch_size, process_count=1, process_index=0) if ev_feats is not None else None
        )
    else:
        tr, ev = _pipelines(job, train_src, eval_src, ft.seed)
        if ev is not None:
            ev = evaluator.bind(ev)
    state = tuner.init_state(variables)
    state, history = tuner.trainer.fit(state, tr, ev, workdir=workdir, desc=f"{ft.model} {ft.mode}", config=job)
    final = tuner.merge(variables, state)

    results: dict[str, Any] = {
        "model": ft.model,
        "mode": ft.mode,
        "steps": int(jax.device_get(state.step)),
        "num_classes": num_classes,
        "trainable_params": n_train,
        "total_params": n_total,
    }
    evals = [r for r in history if "eval/accuracy" in r] or [r for r in _read_rows(workdir) if "eval/accuracy" in r]
    if evals:
        results["final_eval"] = evals[-1]
        results["best_eval"] = max(evals, key=lambda r: r["eval/accuracy"])
    if tuner.probe and eval_src is not None and _in_memory(eval_src):
        results["final_eval_full_model"] = evaluator(final, {"image": eval_src.images, "label": eval_src.labels})
    exports = {"final": final}
    if (averaged := state.averaged()) is not None:  # --ema_decay: the averaged weights and statistics too
        exports["final_ema"] = tuner.merge(variables, averaged)
    if jax.process_index() == 0:
        from converters.torchvision import to_torch

        for name, v in exports.items():
            checkpoint.save_variables(workdir / name, v)
            if job.export_torch:
                torch.save(to_torch(ft.model, v), workdir / f"{name}.pth")
        (workdir / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    _info(f"done: {json.dumps(results.get('final_eval', {}))} -> {workdir}")
    return results


def _count(tuner, variables) -> tuple[int, int]:
    from jtkd import optim

    if tuner.probe:
        total = optim.count_params(variables["params"])[0]
        from jtkd.finetune import split_head

        _, head = split_head(tuner.cfg.model, variables)
        return optim.count_params(head)[0], total
    return optim.count_params(variables["params"], tuner.trainable)


def _read_rows(workdir: Path) -> list[dict[str, Any]]:
    from jtkd.loop import read_jsonl

    p = workdir / "metrics.jsonl"
    return read_jsonl(p) if p.exists() else []


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from jtkd.loop import Preempted

    job = jconfig.parse_cli(FinetuneJob(), sys.argv[1:] if argv is None else argv)
    try:
        return run(job)
    except Preempted as e:  # checkpoint written: a scheduler restarting the command resumes it
        print(e, file=sys.stderr)
        raise SystemExit(143) from None


if __name__ == "__main__":
    use_cpu_flags()  # this process owns XLA: its measured-best CPU flags (no-op on GPU/TPU)
    main()
