"""scikit-learn's digits (1797 real 8x8 grayscale scans, values 0..16): the offline default data set.

Shipped with scikit-learn, so examples, tests and CI run without a download. Typical use is a
transfer pair: `classes=range(5)` as the source task, `classes=range(5, 10)` as the target task
(relabelled to 0..4; `info.label_map` records {5: 0, ..., 9: 4}).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np

from jtkd.data.source import ArrayDataset, DatasetInfo, few_shot_indices, relabel, stratified_indices
from jtkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, resize


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)  # 0..16 -> [0, 1], as ToTensor would give
    images.setflags(write=False)
    labels = d.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def digits(
    split: Literal["train", "test", "all"] = "train",
    *,
    classes: Sequence[int] | None = None,
    labels_per_class: int | None = None,
    image_size: int = 32,
    channels: int = 3,
    test_fraction: float = 0.25,
    split_seed: int = 0,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalize_images: bool = True,
) -> ArrayDataset:
    """Digits as NHWC float32 normalised images and int32 labels.

    Args:
      split: 'train' / 'test' (a stratified split of all 10 classes fixed by `split_seed`, so an
        image's split never depends on `classes` or `seed`) or 'all'.
      classes: original digits to keep, relabelled to 0..k-1 in the order given.
      labels_per_class: few-shot subset of the split, drawn with `seed`.
      image_size: bilinear upscaling of the 8x8 scans (8 keeps them as they are).
      channels: 3 repeats the gray channel (ImageNet models), 1 keeps it.
      mean, std: normalisation after scaling to [0, 1] (ImageNet by default; one value per channel;
        with channels=1 and 3-value statistics their averages are used).
      normalize_images: False keeps pixels in [0, 1], for `batches(..., transform=TrainTransform(...))`
        to augment and normalise per example.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    images, labels = _load()
    if split == "all":
        idx = np.arange(labels.size)
    else:
        train, test = stratified_indices(labels, test_fraction, split_seed)
        idx = train if split == "train" else test

    label_map = relabel(list(classes) if classes is not None else list(range(10)), list(range(10)))
    idx = idx[np.isin(labels[idx], list(label_map))]
    if labels_per_class is not None:
        if labels_per_class < 1:
            raise ValueError(f"labels_per_class must be >= 1, got {labels_per_class}")
        idx = idx[few_shot_indices(labels[idx], labels_per_class, seed)]

    x = images[idx]
    if image_size != x.shape[1]:
        x = np.stack([resize(im[..., None], (image_size, image_size))[..., 0] for im in x]) if len(x) else x
    x = np.repeat(x[..., None], channels, axis=-1)
    if len(mean) == 3 and channels == 1:  # ImageNet defaults with one channel: use the gray weights
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    x = np.ascontiguousarray(x, np.float32)
    if normalize_images:
        x = normalize(x, mean, std)
    y = np.asarray([label_map[int(v)] for v in labels[idx]], np.int32)
    info = DatasetInfo(
        name="digits",
        split=split,
        num_examples=int(y.size),
        class_names=tuple(str(c) for c in label_map),
        label_map=dict(label_map),
        image_shape=(image_size, image_size, channels),
        extra={
            "normalized": normalize_images,
            "source_indices": idx,
            "labels_per_class": labels_per_class,
            "seed": seed,
            "split_seed": split_seed,
        },
    )
    return ArrayDataset(x, y, info)
