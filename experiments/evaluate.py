"""Evaluate a classifier on a labelled data set in JAX, optionally side by side with torchvision.

    python -m experiments.evaluate --model resnet50 --weights DEFAULT --data tfds:imagenet2012 \\
        --split validation --out runs/eval_resnet50
    python -m experiments.evaluate --model resnet18 --checkpoint runs/pets/final.pth \\
        --data folder:/data/pets/val --class_folder /data/pets/train --compare_torch --out runs/pets_eval
    python -m experiments.evaluate --model resnet18 --checkpoint runs/ft/final --data digits --image_size 32

The model: a torch state_dict (--checkpoint .pth/.pt/.safetensors, loaded weights_only), jtkd variables
(--checkpoint DIR: `python -m converters ... --out`'s variables/, a fine-tuning run's final/) or torchvision's
weights (--weights DEFAULT, needs internet). Its number of classes must be the data's. Images: with --weights
(and no --image_size) the weights' own evaluation preset (`weights.transforms()`), otherwise torchvision's
ImageNet evaluation at --image_size (resize to size / 0.875, center crop); digits come preprocessed.

OUT/metrics.json: top-1 and top-5 accuracy, mean cross-entropy, per-class precision / recall / support, macro
averages and the confusion matrix (rows: true class); OUT/confusion.png; OUT/predictions.csv (per example:
its index in the split, the file for folder data, label, prediction, the prediction's probability, top-5).
--compare_torch runs the torchvision model on the same preprocessed arrays (on the CPU: --limit keeps it
short) and adds its accuracy, the top-1 agreement and the largest logit difference to metrics.json.
Single-process (one host, all its devices).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np

from jtkd import config as jconfig
from jtkd.data.folder import FolderOptions
from jtkd.xla_flags import use_cpu_flags


@dataclasses.dataclass(frozen=True)
class EvaluateJob:
    model: str = "resnet18"
    checkpoint: str = ""  # torch state_dict file, or a directory of jtkd variables
    weights: str = ""  # torchvision weights name (DEFAULT, IMAGENET1K_V2, ...): downloaded through torchvision
    data: str = "digits"  # digits | tfds:NAME | folder:PATH
    split: str = "test"  # digits / tfds split
    class_folder: str = ""  # folder data: the training folder whose classes label this one (by name)
    tfds_data_dir: str = ""
    download: bool = False  # let tfds download and prepare the data set (needs internet)
    image_size: int = 0  # 0: the weights' evaluation crop with --weights, else the model's input size (digits 32)
    batch_size: int = 256
    limit: int = 0  # the first N examples only (0: all)
    compare_torch: bool = False  # torchvision on the same arrays: accuracy, top-1 agreement, logit difference
    num_devices: int = 0  # 0: every device
    num_workers: int = 8
    folder: FolderOptions = dataclasses.field(default_factory=FolderOptions)
    progress: bool = True
    out: str = "runs/evaluate"

    def validate(self) -> None:
        if bool(self.checkpoint) == bool(self.weights):
            raise ValueError("pass exactly one of --checkpoint PATH and --weights NAME")
        kind = self.data.split(":", 1)[0]
        if kind not in ("digits", "tfds", "folder") or (kind != "digits" and ":" not in self.data):
            raise ValueError(f"--data must be digits, tfds:NAME or folder:PATH; got {self.data!r}")
        if self.batch_size < 1 or self.limit < 0 or self.image_size < 0:
            raise ValueError("batch_size must be >= 1, limit and image_size >= 0")


# ------------------------------------------------------------------------------------------ model
def load_model(job: EvaluateJob) -> tuple[dict[str, Any], Mapping[str, Any] | None]:
    """(Flax variables, the torch state_dict when there is one: for --compare_torch)."""
    from converters import torchvision as tvc

    path = Path(job.checkpoint) if job.checkpoint else None
    if path is not None and path.is_dir():
        from jtkd.checkpoint import load_variables

        variables = load_variables(path)
        return variables, None
    sd = tvc.load_checkpoint(path) if path is not None else tvc.download_weights(job.model, job.weights)
    return tvc.convert(job.model, sd), sd


# ------------------------------------------------------------------------------------------- data
def load_source(job: EvaluateJob, image_size: int) -> Any:
    from jtkd import data

    kind, _, arg = job.data.partition(":")
    if kind == "digits":
        src = data.digits(job.split, image_size=image_size)
    elif kind == "tfds":
        src = data.tfds_source(arg, job.split, data_dir=job.tfds_data_dir or None, download=job.download)
    else:
        opts = dict(dataclasses.asdict(job.folder), num_workers=job.num_workers, split=Path(arg).name)
        if job.class_folder:
            names = data.image_folder(job.class_folder, **opts).info.class_names
            src = data.eval_folder(arg, names, **opts)
        else:
            src = data.image_folder(arg, **opts)
    if job.limit and job.limit < len(src):
        src = data.subset(src, np.arange(job.limit))
    return src


def transform(job: EvaluateJob, default_size: int) -> tuple[Any, int, str]:
    """(per-image transform or None for preprocessed digits, image size, a description)."""
    from jtkd import data

    if job.data == "digits":
        size = job.image_size or 32
        return None, size, f"digits upscaled to {size} px, ImageNet mean/std"
    if job.weights and not job.image_size:
        from converters.torchvision import eval_transform

        tf = eval_transform(job.model, job.weights)
    else:
        tf = data.EvalTransform(job.image_size or default_size)
    how = f"resize {tf.resize_to} ({tf.interpolation}), center crop {tf.size}, mean {tf.mean}, std {tf.std}"
    return tf, tf.size, how


def source_files(src: Any) -> list[str] | None:
    """The file of each example of a folder source (or a subset of one), else None."""
    indices = getattr(src, "indices", None)
    base = src.source if indices is not None else src
    if not hasattr(base, "files"):
        return None
    return [str(base.files[i]) for i in indices] if indices is not None else [str(f) for f in base.files]


def batches(job: EvaluateJob, src: Any, tf: Any) -> Iterator[dict[str, np.ndarray]]:
    from jtkd import data

    return data.batches(src, job.batch_size, transform=tf, train=False, with_index=True, num_workers=job.num_workers)


# ---------------------------------------------------------------------------------------- metrics
def classification_report(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Top-1 / top-5 accuracy, mean cross-entropy, per-class precision, recall and support, their macro
    means (over the classes present in `labels`) and the confusion matrix (rows: true class)."""
    n, c = logits.shape
    z = logits.astype(np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    pred = logits.argmax(1)
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, : min(5, c)]
    confusion = np.zeros((c, c), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support, predicted, correct = confusion.sum(1), confusion.sum(0), np.diag(confusion)
    recall = np.divide(correct, support, out=np.zeros(c), where=support > 0)
    precision = np.divide(correct, predicted, out=np.zeros(c), where=predicted > 0)
    present = support > 0
    return {
        "count": int(n),
        "accuracy": float((pred == labels).mean()),
        "top5_accuracy": float((top5 == labels[:, None]).any(1).mean()),
        "loss": float(-log_p[np.arange(n), labels].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_precision": float(precision[present].mean()),
        "per_class": [
            {"class": name, "support": int(support[k]), "recall": float(recall[k]), "precision": float(precision[k])}
            for k, name in enumerate(class_names)
        ],
        "confusion": confusion.tolist(),
    }


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (recall per true class); class names on the axes up to 40 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(class_names)
    rows = confusion.sum(1, keepdims=True)
    frac = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    size = min(4 + 0.25 * c, 20)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if c <= 40:
        ax.set_xticks(range(c), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(c), class_names, fontsize=8)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_predictions(path: Path, rows: Mapping[str, np.ndarray], class_names: Sequence[str],
                      files: Sequence[str] | None) -> None:
    logits, labels, index = rows["logits"], rows["label"], rows["index"]
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, : min(5, logits.shape[1])]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "file", "label", "prediction", "probability", "top5"])
        for i in range(len(labels)):
            pred = top5[i, 0]
            w.writerow([int(index[i]), files[index[i]] if files is not None else "", class_names[labels[i]],
                        class_names[pred], f"{p[i, pred]:.6f}", " ".join(class_names[k] for k in top5[i])])


def torch_logits(job: EvaluateJob, state_dict: Mapping[str, Any], src: Any, tf: Any) -> np.ndarray:
    """torchvision's logits on the same preprocessed images, in the split's order."""
    from converters import parity

    model = parity.torch_model(job.model, dict(state_dict))
    out = []
    for batch in batches(job, src, tf):
        keep = batch["mask"].astype(bool)
        out.append(parity.torch_logits(model, batch["image"][keep].transpose(0, 3, 1, 2)))
    return np.concatenate(out)


# -------------------------------------------------------------------------------------------- run
def run(job: EvaluateJob) -> dict[str, Any]:
    from converters.torchvision import implied_kwargs, to_torch
    from jtkd import models, train
    from jtkd.finetune import FeatureExtractor
    from jtkd.loop import _info, setup_logging

    setup_logging()
    models.get_spec(job.model)  # unknown names: the list of supported ones
    variables, state_dict = load_model(job)  # everything that can fail on the inputs, before writing
    tf, size, how = transform(job, models.input_size(job.model, implied_kwargs(job.model, variables)))
    models.check_input_size(job.model, size)
    src = load_source(job, size)
    names = list(src.info.class_names)
    have = models.num_classes(job.model, variables)
    if have != len(names):
        raise ValueError(f"the model predicts {have} classes but {job.data} has {len(names)}: evaluate it on data "
                         "with its classes (fine-tune it on these first)")
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    mesh = train.make_mesh(job.num_devices or None)
    _info(f"{job.model} on {job.data} [{job.split}]: {len(src)} examples, {len(names)} classes, {how}; "
          f"{mesh.devices.size} devices")
    extract = FeatureExtractor(job.model, mesh, job.batch_size, progress=job.progress, template=variables, logits=True)
    rows = extract(variables, batches(job, src, tf), desc="evaluate")
    metrics = classification_report(rows["logits"], rows["label"], names)
    result: dict[str, Any] = {
        "model": job.model,
        "source": job.checkpoint or f"torchvision:{job.weights}",
        "data": job.data,
        "split": job.split,
        "preprocessing": how,
        **metrics,
    }
    if job.compare_torch:
        ref = torch_logits(job, state_dict if state_dict is not None else to_torch(job.model, variables), src, tf)
        result["torch"] = {
            "accuracy": float((ref.argmax(1) == rows["label"]).mean()),
            "top1_agreement": float((ref.argmax(1) == rows["logits"].argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(ref - rows["logits"]).max()),
            "max_abs_logit": float(np.abs(ref).max()),
        }
    files = source_files(src)
    write_predictions(out / "predictions.csv", rows, names, files)
    plot_confusion(np.asarray(metrics["confusion"]), names, out / "confusion.png",
                   f"{job.model} on {job.data} [{job.split}]: top-1 {metrics['accuracy']:.4f}")
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("count", "accuracy", "top5_accuracy", "loss")}
    _info(f"{json.dumps(summary)}{' torch: ' + json.dumps(result['torch']) if 'torch' in result else ''} -> {out}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    job = jconfig.parse_cli(EvaluateJob(), sys.argv[1:] if argv is None else argv)
    try:
        return run(job)
    except (ValueError, FileNotFoundError, ConnectionError, RuntimeError) as e:  # bad input: one line naming it
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    use_cpu_flags()  # this process owns XLA: its measured-best CPU flags (no-op on GPU/TPU)
    main()
