"""Input pipeline throughput (images/s, one host thread) against what the train step consumes.

Baseline (always timed): the standard ImageNet training transform in numpy + PIL, one image at a
time: resize to side/0.875 (bilinear), random crop to side, random horizontal flip, then the batch
is converted to float32 and normalised with torchvision's mean/std (vectorised). Two sources:
already-decoded uint8 images, and JPEG bytes (quality 90, PIL decode), both square at 1.43x the
training side (320 px for 224). Then `jtkd.data.batches` with `TrainTransform` (torchvision's
RandomResizedCrop + flip + normalise, a different crop than the baseline's) over the same images,
with no worker threads (`_0w`) and with one per core (`_<n>w`). Names end in the source kind.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np

from bench.common import Preset, Runner, interleaved, short_error

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
BATCH = 32


def source_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random photos-like uint8 images (noise compresses unrealistically badly as JPEG)."""
    from PIL import Image

    side = round(size * 1.43)
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, max(side // 8, 2), max(side // 8, 2), 3), dtype=np.uint8)
    out = np.empty((n, side, side, 3), np.uint8)
    for i in range(n):
        out[i] = np.asarray(Image.fromarray(small[i]).resize((side, side), Image.BICUBIC))
    out = np.clip(out.astype(np.int16) + rng.integers(-8, 9, out.shape), 0, 255).astype(np.uint8)
    return out


def encode_jpeg(images: np.ndarray, quality: int = 90) -> list[bytes]:
    from PIL import Image

    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        blobs.append(buf.getvalue())
    return blobs


def numpy_batches(source: np.ndarray | list[bytes], size: int, batch: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The baseline pipeline: decode?, resize, random crop, flip, normalise -> {'image', 'label'}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    resize = round(size / 0.875)
    n = len(source)
    for start in range(0, n - batch + 1, batch):
        out = np.empty((batch, size, size, 3), np.uint8)
        for j in range(batch):
            item = source[start + j]
            im = Image.open(io.BytesIO(item)).convert("RGB") if isinstance(item, bytes) else Image.fromarray(item)
            a = np.asarray(im.resize((resize, resize), Image.BILINEAR))
            y0, x0 = rng.integers(0, resize - size + 1, 2)
            a = a[y0 : y0 + size, x0 : x0 + size]
            out[j] = a[:, ::-1] if rng.random() < 0.5 else a
        image = (out.astype(np.float32) - MEAN) / STD
        yield {"image": image, "label": rng.integers(0, 10, batch).astype(np.int32)}


def _consume(make_iter: Any) -> Runner:
    def run(n: int) -> None:
        for _ in range(n):
            for b in make_iter():
                b["image"].shape  # noqa: B018  the arrays exist once the iterator yields them

    return run


class _Source:
    """A random-access source for jtkd.data.batches: uint8 arrays or JPEG bytes (decoded on access)."""

    def __init__(self, items: np.ndarray | list[bytes]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        item = self.items[i]
        image = Image.open(io.BytesIO(item)) if isinstance(item, bytes) else item
        return {"image": image, "label": 0}


def jtkd_data_runners(images: np.ndarray, blobs: list[bytes], size: int, batch: int) -> dict[str, Runner]:
    """jtkd.data.batches + TrainTransform (RandomResizedCrop, flip, normalise) over the same images,
    on the calling thread (num_workers=0) and on a pool as wide as the machine."""
    from bench.common import num_cores
    from jtkd import data

    runners: dict[str, Runner] = {}
    for src_name, items in (("uint8", images), ("jpeg", blobs)):
        for workers in sorted({0, num_cores()}):
            def make_iter(items: Any = items, workers: int = workers) -> Iterator[dict[str, np.ndarray]]:
                return data.batches(_Source(items), batch, transform=data.TrainTransform(size), train=True,
                                    num_epochs=1, num_workers=workers, seed=0)

            runners[f"jtkd_data_{src_name}_{workers}w"] = _consume(make_iter)
    return runners


def run(preset: Preset, progress: Any = None) -> list[dict[str, Any]]:
    results = []
    for size in preset.pipeline_sizes:
        batch = min(BATCH, preset.pipeline_images)
        res: dict[str, Any] = {"size": size, "batch": batch, "images": preset.pipeline_images, "contenders": {}, "notes": {}}
        try:
            images = source_images(preset.pipeline_images, size)
            blobs = encode_jpeg(images)
            res["source_side"] = images.shape[1]
            res["jpeg_kb_mean"] = float(np.mean([len(b) for b in blobs]) / 1024)
            runners: dict[str, Runner] = {
                "numpy_pil_uint8": _consume(lambda i=images, s=size, b=batch: numpy_batches(i, s, b)),
                "numpy_pil_jpeg": _consume(lambda j=blobs, s=size, b=batch: numpy_batches(j, s, b)),
            }
            runners.update(jtkd_data_runners(images, blobs, size, batch))
            n_img = (preset.pipeline_images // batch) * batch
            timings = interleaved(runners, warmup=1, repeats=preset.repeats, steps=1, progress=progress)
            for name, t in timings.items():
                res["contenders"][name] = t.summary(n_img)
        except Exception as e:  # noqa: BLE001 - a failing benchmark is recorded, not fatal
            res["error"] = short_error(e, 1000)
        results.append(res)
    return results
