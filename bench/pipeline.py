"""Input pipeline throughput (images/s, one host thread) against what the train step consumes.

Baseline (always timed): the standard ImageNet training transform in numpy + PIL, one image at a
time: resize to side/0.875 (bilinear), random crop to side, random horizontal flip, then the batch
is converted to float32 and normalised with torchvision's mean/std (vectorised). Two sources:
already-decoded uint8 images, and JPEG bytes (quality 90, PIL decode), both square at 1.43x the
training side (320 px for 224, as ImageNet's typical ~400x350 photos shrink to after decode at
reduced size). If `jtkd.data` (branch `data`) is importable, its pipeline is timed too.
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


def jtkd_data_runner(images: np.ndarray, size: int, batch: int) -> tuple[Runner | None, str]:
    """jtkd.data's pipeline over the same uint8 images, if that module exists on this branch."""
    try:
        from jtkd import data
    except ImportError:
        return None, "jtkd.data is not on this branch: only the numpy/PIL baseline is timed"
    for fn_name in ("from_arrays", "array_source"):
        fn = getattr(data, fn_name, None)
        if fn is None:
            continue
        try:
            labels = np.zeros(len(images), np.int32)

            def make_iter() -> Iterator[dict[str, np.ndarray]]:
                return data.batches(fn(images, labels), batch_size=batch, image_size=size, train=True, seed=0)

            next(iter(make_iter()))
            return _consume(make_iter), f"jtkd.data.{fn_name} + jtkd.data.batches"
        except Exception as e:  # API differs from what this bench expects
            return None, f"jtkd.data present but not usable here: {short_error(e)}"
    return None, "jtkd.data present but exposes no in-memory array source (from_arrays/array_source)"


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
                "numpy_pil_uint8": _consume(lambda: numpy_batches(images, size, batch)),
                "numpy_pil_jpeg": _consume(lambda: numpy_batches(blobs, size, batch)),
            }
            runner, note = jtkd_data_runner(images, size, batch)
            res["notes"]["jtkd_data"] = note
            if runner is not None:
                runners["jtkd_data"] = runner
            n_img = (preset.pipeline_images // batch) * batch
            timings = interleaved(runners, warmup=1, repeats=preset.repeats, steps=1, progress=progress)
            for name, t in timings.items():
                res["contenders"][name] = t.summary(n_img)
        except Exception as e:
            res["error"] = short_error(e, 1000)
        results.append(res)
    return results
