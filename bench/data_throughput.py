"""Input-pipeline throughput: decode + augment JPEGs from an image folder, images/s vs workers.

    PYTHONPATH=. python bench/data_throughput.py --num_images 256 --workers 0,1,2,4 --out /tmp/bench_data

Builds an ImageNet-like folder (natural photos from scikit-image, resized to ~500x375 and saved as
JPEG), then times `jtkd.data.batches` with TrainTransform / EvalTransform at `--size`. Results go to
`<out>/data_throughput.jsonl` (one line per setting) and are printed as a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import skimage.data
from PIL import Image

from jtkd import data


@dataclass
class Config:
    num_images: int = 256
    num_classes: int = 4
    size: int = 224
    batch_size: int = 32
    workers: str = "0,1,2,4"
    out: str = "/tmp/bench_data"
    repeats: int = 2


def make_folder(root: str, cfg: Config) -> None:
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    rng = np.random.default_rng(0)
    for i in range(cfg.num_images):
        d = os.path.join(root, f"class_{i % cfg.num_classes}")
        os.makedirs(d, exist_ok=True)
        w, h = (500, 375) if rng.uniform() < 0.5 else (375, 500)
        Image.fromarray(photos[i % len(photos)]).resize((w, h)).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    cfg = Config(**vars(parser.parse_args()))
    root = os.path.join(cfg.out, f"folder_{cfg.num_images}")
    if not os.path.isdir(root):
        make_folder(root, cfg)
    t0 = time.perf_counter()
    ds = data.image_folder(root)
    scan_s = time.perf_counter() - t0
    os.makedirs(cfg.out, exist_ok=True)
    results = []
    for mode, transform in [("train", data.TrainTransform(cfg.size)), ("eval", data.EvalTransform(cfg.size))]:
        for workers in (int(w) for w in cfg.workers.split(",")):
            best, cpu = float("inf"), float("inf")
            for _ in range(cfg.repeats):
                t, c = time.perf_counter(), time.process_time()
                n = 0
                for b in data.batches(
                    ds,
                    cfg.batch_size,
                    transform=transform,
                    train=mode == "train",
                    num_epochs=1,
                    num_workers=workers,
                    process_index=0,
                    process_count=1,
                ):
                    n += int(b["mask"].sum()) if "mask" in b else b["image"].shape[0]
                best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
            results.append(
                {
                    "mode": mode,
                    "workers": workers,
                    "images": n,
                    "seconds": best,
                    "images_per_s": n / best,
                    "cpu_seconds": cpu,
                    "images_per_cpu_s": n / cpu,
                    "size": cfg.size,
                    "cpus": os.cpu_count(),
                    "scan_seconds": scan_s,
                }
            )
            print(f"{mode:5s} workers={workers:2d}  {n / best:8.1f} images/s  ({n / cpu:7.1f} per CPU-second)")
    with open(os.path.join(cfg.out, "data_throughput.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    main()
