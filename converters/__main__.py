"""python -m converters NAME (--checkpoint PATH | --weights DEFAULT) --out DIR [--images PATH ...]

Converts a torchvision checkpoint to Flax variables, saves them as an orbax checkpoint in
DIR/variables, and writes DIR/report.json: max abs logit difference against torch on a probe
batch, parameter count, conversion seconds. The probe is Gaussian noise, or with --images your own
photos (files or folders), preprocessed as the weights' own `transforms()` (with --weights) or
torchvision's ImageNet evaluation at the probe size: the report then also gives each image's top-5
classes in torch and in JAX, with probabilities, and how often they agree. Bad input (checkpoint or
images) is reported before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from converters import parity
from converters.torchvision import (
    ConversionError,
    UnsafeCheckpointError,
    convert,
    download_weights,
    eval_transform,
    load_checkpoint,
    model_kwargs,
    weights_entry,
)
from jtkd import checkpoint, models
from jtkd.data.folder import IMG_EXTENSIONS, list_files, load_image
from jtkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, center_crop, normalize, resize, to_float


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="torchvision builder name, e.g. resnet50")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="torch state_dict: .pth/.pt (loaded weights_only) or .safetensors")
    src.add_argument("--weights", help="torchvision weights: DEFAULT or an enum member name (needs internet)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--probe-batch", type=int, default=2, help="noise probe: this many examples (not with --images)")
    ap.add_argument("--probe-size", type=int, nargs=2, metavar=("H", "W"),
                    help="default: the model's input size (a ViT's: the checkpoint's image_size); with --images "
                         "and --weights, the weights' own evaluation crop")
    ap.add_argument("--images", nargs="+", metavar="PATH",
                    help="probe with these images (files, or folders of them) instead of noise")
    args = ap.parse_args(argv)
    models.get_spec(args.name)  # unknown names: the list of supported ones
    try:  # everything that can fail on the input, before anything is written
        files = image_files(args.images) if args.images else []
        sd = load_checkpoint(args.checkpoint) if args.checkpoint else download_weights(args.name, args.weights)
        default = models.input_size(args.name, model_kwargs(args.name, sd))
        if files:
            (h, w), load, preprocessing = image_transform(args.name, args.weights, args.probe_size, default)
            x = np.stack([load(f) for f in files])
        else:
            h, w = args.probe_size or (default, default)
            x, preprocessing = parity.probe_batch(args.probe_batch, h, w), "gaussian noise"
        t0 = time.perf_counter()
        variables = convert(args.name, sd)
        seconds = time.perf_counter() - t0
    except (ConversionError, UnsafeCheckpointError, ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)  # BadImageError is a ValueError naming the file
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_variables(out / "variables", variables)

    model = parity.torch_model(args.name, sd)
    ref = parity.torch_logits(model, x)
    got = parity.flax_logits(args.name, variables, x)  # the module the variables' shapes imply
    report = {
        "model": args.name,
        "source": args.checkpoint or f"torchvision:{args.weights}",
        "num_classes": int(ref.shape[-1]),
        "param_count": int(sum(np.size(p) for p in jax.tree.leaves(variables["params"]))),
        "batch_stats_count": int(sum(np.size(p) for p in jax.tree.leaves(variables["batch_stats"]))),
        "convert_seconds": round(seconds, 4),
        "probe": preprocessing,
        "probe_shape_nchw": list(x.shape),
        "max_abs_logit_diff": float(np.abs(ref - got).max()),
        "max_abs_logit": float(np.abs(ref).max()),  # the diff's scale
        "argmax_equal": bool((ref.argmax(-1) == got.argmax(-1)).all()),
        "variables": str((out / "variables").resolve()),
    }
    if files:
        report.update(image_report(files, ref, got, class_names(args.name, args.weights, ref.shape[-1])))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "images"}, indent=2))
    for row in report.get("images", []):
        (t, pt), (j, pj) = row["torch_top5"][0], row["jax_top5"][0]
        print(f"{row['file']}: torch {t!r} {pt:.4f} | jax {j!r} {pj:.4f}")
    return 0


def image_files(paths: Sequence[str]) -> list[str]:
    """The image files among `paths`, folders expanded (recursively, sorted); none found is an error."""
    files: list[str] = []
    for p in paths:
        if Path(p).is_dir():
            files += [f for f in list_files(p) if f.lower().endswith(IMG_EXTENSIONS)]
        elif Path(p).is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--images: {p!r} is neither a file nor a folder")
    if not files:
        raise FileNotFoundError(f"--images: no image files ({', '.join(IMG_EXTENSIONS)}) in {', '.join(paths)}")
    return files


def image_transform(
    name: str, weights: str | None, size: Sequence[int] | None, default: int
) -> tuple[tuple[int, int], Callable[[str], np.ndarray], str]:
    """((h, w), path -> (3, h, w) float32 array, a description): with --weights (and no --probe-size) the
    weights' own evaluation preset (its resize, crop, interpolation, mean and std, as
    `weights.transforms()`); otherwise torchvision's ImageNet evaluation at the probe size (the shorter
    side to max(h, w) / 0.875, bilinear, center crop)."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if weights and size is None:
        preset = eval_transform(name, weights)
        h = w = preset.size
        resize_to, interpolation, mean, std = preset.resize_to, preset.interpolation, preset.mean, preset.std
    else:
        h, w = size or (default, default)
        resize_to, interpolation = int(max(h, w) / 0.875), "bilinear"

    def load(path: str) -> np.ndarray:
        img = center_crop(resize(load_image(path), resize_to, interpolation), (h, w))
        return normalize(to_float(img), mean, std).transpose(2, 0, 1)

    return (h, w), load, f"images: resize {resize_to} ({interpolation}), center crop {h}x{w}"


def class_names(name: str, weights: str | None, num_classes: int) -> list[str] | None:
    """The weights' category names (torchvision's meta, offline); for a checkpoint, ImageNet-1k's when it
    has 1000 classes (torchvision's DEFAULT weights' list), else none."""
    try:
        cats = weights_entry(name, weights or "DEFAULT").meta.get("categories")
    except ValueError:
        return None
    return list(cats) if cats is not None and len(cats) == num_classes else None


def image_report(files: list[str], ref: np.ndarray, got: np.ndarray, names: list[str] | None) -> dict:
    """Per image, torch's and JAX's top-5 (class, probability); top-1 and top-5 agreement over the images."""

    def softmax(logits: np.ndarray) -> np.ndarray:
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)

    p_ref, p_got = softmax(ref.astype(np.float64)), softmax(got.astype(np.float64))
    o_ref, o_got = (np.argsort(-p, axis=-1, kind="stable")[:, :5] for p in (p_ref, p_got))

    def top5(p: np.ndarray, order: np.ndarray) -> list[list]:
        return [[names[c] if names else int(c), round(float(p[c]), 6)] for c in order]

    rows = [
        {"file": f, "torch_top5": top5(r, a), "jax_top5": top5(g, b), "max_abs_prob_diff": float(np.abs(r - g).max())}
        for f, r, g, a, b in zip(files, p_ref, p_got, o_ref, o_got)
    ]
    return {
        "top1_agreement": float((p_ref.argmax(-1) == p_got.argmax(-1)).mean()),
        "top5_order_agreement": float((o_ref == o_got).all(-1).mean()),
        "class_names": "torchvision weights meta" if names else None,
        "images": rows,
    }


if __name__ == "__main__":
    sys.exit(main())
