"""python -m converters NAME (--checkpoint PATH | --weights DEFAULT) --out DIR

Converts a torchvision checkpoint to Flax variables, saves them as an orbax checkpoint in
DIR/variables, and writes DIR/report.json: max abs logit difference against torch on a probe
batch, parameter count, conversion seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from converters import parity
from converters.torchvision import (
    ConversionError,
    UnsafeCheckpointError,
    convert,
    download_weights,
    load_checkpoint,
    model_kwargs,
)
from jtkd import checkpoint, models


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="torchvision builder name, e.g. resnet50")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="torch state_dict: .pth/.pt (loaded weights_only) or .safetensors")
    src.add_argument("--weights", help="torchvision weights: DEFAULT or an enum member name (needs internet)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--probe-batch", type=int, default=2)
    ap.add_argument("--probe-size", type=int, nargs=2, metavar=("H", "W"),
                    help="default: the model's input size (a ViT's: the checkpoint's image_size)")
    args = ap.parse_args(argv)
    models.get_spec(args.name)  # unknown names: the list of supported ones
    try:
        sd = load_checkpoint(args.checkpoint) if args.checkpoint else download_weights(args.name, args.weights)
        t0 = time.perf_counter()
        variables = convert(args.name, sd)
        seconds = time.perf_counter() - t0
    except (ConversionError, UnsafeCheckpointError, ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_variables(out / "variables", variables)

    h, w = args.probe_size or (models.input_size(args.name, model_kwargs(args.name, sd)),) * 2
    x = parity.probe_batch(args.probe_batch, h, w)
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
        "probe_shape_nchw": list(x.shape),
        "max_abs_logit_diff": float(np.abs(ref - got).max()),
        "max_abs_logit": float(np.abs(ref).max()),  # the diff's scale
        "argmax_equal": bool((ref.argmax(-1) == got.argmax(-1)).all()),
        "variables": str((out / "variables").resolve()),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
