"""torchvision-equivalent image preprocessing in numpy/PIL, seeded per example.

The uint8 path (PIL images) reproduces torchvision's PIL backend exactly: `Resize` is PIL's
antialiased resampling at torchvision's output size, `CenterCrop` uses torchvision's rounding (and
zero padding when the crop is larger than the image), `ToTensor` divides by 255 and `Normalize`
subtracts the mean and divides by the std in float32. The float path (HWC float arrays in [0, 1],
e.g. upscaled digits) resamples each channel with PIL's 32-bit float mode, the same antialiased
filter torchvision's tensor backend uses (`antialias=True`), without uint8 rounding.

Randomness comes from an explicit `np.random.Generator`; `example_rng(seed, epoch, index)` makes
one per example so augmentation does not depend on thread scheduling, batch size or host count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Interpolation = Literal["nearest", "bilinear", "bicubic"]
_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
ImageLike = Image.Image | np.ndarray


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Independent stream per (seed, epoch, example): identical whatever the worker/host layout."""
    return np.random.default_rng((seed, epoch, index))


def as_image(image: ImageLike) -> ImageLike:
    """PIL image (any mode -> RGB) or float HWC array in [0, 1]; uint8 arrays become PIL RGB."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        if arr.ndim == 2:
            return Image.fromarray(arr, "L").convert("RGB")
        if arr.ndim == 3 and arr.shape[-1] == 3:
            return Image.fromarray(arr, "RGB")
        raise ValueError(f"expected a HxW or HxWx1/3 uint8 image, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise ValueError(f"expected a HxWxC float image, got shape {arr.shape}")
        return arr.astype(np.float32, copy=False)
    raise TypeError(f"unsupported image dtype {arr.dtype} (use uint8 0..255 or float 0..1)")


def image_hw(image: ImageLike) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])


def resized_hw(hw: tuple[int, int], size: int | Sequence[int]) -> tuple[int, int]:
    """torchvision's output size: an int sets the shorter side, the longer one is truncated."""
    if isinstance(size, Sequence):
        if len(size) == 2:
            return int(size[0]), int(size[1])
        (size,) = size
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = int(size), int(int(size) * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def resize(image: ImageLike, size: int | Sequence[int], interpolation: Interpolation = "bilinear") -> ImageLike:
    """`torchvision.transforms.functional.resize` (antialiased for bilinear/bicubic)."""
    image = as_image(image)
    out_h, out_w = resized_hw(image_hw(image), size)
    if (out_h, out_w) == image_hw(image):
        return image  # torchvision returns the input untouched too
    resample = _PIL_RESAMPLE[interpolation]
    if isinstance(image, Image.Image):
        return image.resize((out_w, out_h), resample)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), "F").resize((out_w, out_h), resample))
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def crop(image: ImageLike, top: int, left: int, height: int, width: int) -> ImageLike:
    """Crop box; regions outside the image are zero (as PIL's crop and torchvision's)."""
    image = as_image(image)
    if isinstance(image, Image.Image):
        return image.crop((left, top, left + width, top + height))
    h, w, c = image.shape
    out = np.zeros((height, width, c), np.float32)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + height, h), min(left + width, w)
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return out


def center_crop(image: ImageLike, size: int | Sequence[int]) -> ImageLike:
    """`torchvision.transforms.functional.center_crop`: round-half-even offsets, zero pad if larger."""
    ch, cw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    h, w = image_hw(image)
    if ch > h or cw > w:
        # torchvision pads (left/top get the floor half) and then crops at the centre
        top, left = -((ch - h) // 2) if ch > h else 0, -((cw - w) // 2) if cw > w else 0
        image = crop(image, top, left, max(h, ch), max(w, cw))
        h, w = image_hw(image)
        if (h, w) == (ch, cw):
            return image
    return crop(image, round((h - ch) / 2.0), round((w - cw) / 2.0), ch, cw)


def hflip(image: ImageLike) -> ImageLike:
    image = as_image(image)
    if isinstance(image, Image.Image):
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image[:, ::-1]


def to_float(image: ImageLike) -> np.ndarray:
    """`ToTensor` without the transpose: HWC float32 in [0, 1]."""
    image = as_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return image


def normalize(x: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """`Normalize(mean, std)` on HWC (or NHWC) float32."""
    mean_a, std_a = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if x.shape[-1] != mean_a.shape[0] or std_a.shape != mean_a.shape:
        raise ValueError(f"image has {x.shape[-1]} channels but mean/std have {mean_a.shape[0]}/{std_a.shape[0]}")
    return (x.astype(np.float32, copy=False) - mean_a) / std_a


def _random_boxes(
    hw: tuple[int, int], rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> Iterator[tuple[float, float]]:
    """torchvision's 10 draws of a box with area `scale` x the image's and aspect ratio in `ratio`
    (log-uniform): (sqrt(area * aspect), sqrt(area / aspect)) each, before rounding."""
    area = hw[0] * hw[1]
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        yield math.sqrt(target_area * aspect), math.sqrt(target_area / aspect)


def random_resized_crop_params(
    hw: tuple[int, int],
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` (10 tries, then a central crop): (top, left, h, w)."""
    height, width = hw
    for a, b in _random_boxes(hw, rng, scale, ratio):
        w, h = round(a), round(b)  # aspect = w / h
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_erasing_params(
    hw: tuple[int, int],
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> tuple[int, int, int, int] | None:
    """torchvision's `RandomErasing` box (10 tries): (top, left, h, w), or None when no box fits (nothing
    is erased, as torchvision does then)."""
    height, width = hw
    for a, b in _random_boxes(hw, rng, scale, ratio):
        h, w = round(a), round(b)  # aspect = h / w here
        if h < height and w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


@dataclass(frozen=True)
class RandomErasing:
    """torchvision's `RandomErasing(p, scale, ratio, value)` on an HWC float image, after `Normalize` as in
    torchvision's recipes (value 0 is the mean colour there). `on_batch` is the `ArraySource` augmentation
    for arrays already preprocessed (each row on its own)."""

    prob: float = 0.5
    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.prob <= 1:
            raise ValueError(f"random erasing probability must be in [0, 1], got {self.prob}")

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.uniform() >= self.prob:
            return x
        box = random_erasing_params(x.shape[:2], rng, self.scale, self.ratio)
        if box is None:
            return x
        top, left, h, w = box
        x = x.copy()
        x[top : top + h, left : left + w] = self.value
        return x

    def on_batch(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {**batch, "image": np.stack([self(x, rng) for x in batch["image"]])}


@dataclass(frozen=True)
class EvalTransform:
    """Resize(resize_size) + CenterCrop(size) + ToTensor + Normalize, as torchvision's ImageNet eval.

    `resize_size` defaults to int(size / crop_fraction): 256 for 224 at the usual 0.875.
    """

    size: int = 224
    resize_size: int | None = None
    crop_fraction: float = 0.875
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def resize_to(self) -> int:
        return self.resize_size if self.resize_size is not None else int(self.size / self.crop_fraction)

    def __call__(self, image: ImageLike, rng: np.random.Generator | None = None) -> np.ndarray:
        del rng  # deterministic
        image = center_crop(resize(image, self.resize_to, self.interpolation), self.size)
        return normalize(to_float(image), self.mean, self.std)


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip(p) + ToTensor + Normalize
    [+ RandomErasing(erase_prob) when erase_prob > 0]."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    erase_prob: float = 0.0
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, image: ImageLike, rng: np.random.Generator) -> np.ndarray:
        image = as_image(image)
        top, left, h, w = random_resized_crop_params(image_hw(image), rng, self.scale, self.ratio)
        image = resize(crop(image, top, left, h, w), (self.size, self.size), self.interpolation)
        if rng.uniform() < self.flip_prob:
            image = hflip(image)
        x = normalize(np.ascontiguousarray(to_float(image)), self.mean, self.std)
        return RandomErasing(self.erase_prob)(x, rng) if self.erase_prob > 0 else x
