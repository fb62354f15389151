"""What every data source shares: metadata, the random-access protocol, in-memory arrays."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a source. `class_names[label]` names a label; `label_map` maps the original
    label (digit, tfds label id, or folder name) to the label the batches carry, so a relabelling
    (e.g. digits 5..9 -> 0..4) is always explicit."""

    name: str
    split: str
    num_examples: int
    class_names: tuple[str, ...]
    label_map: Mapping[Hashable, int]
    image_shape: tuple[int, ...] | None = None  # None: varies per example (decoded images)
    skipped: tuple[str, ...] = ()  # files left out (image_folder with on_bad='skip')
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self, labels: np.ndarray) -> dict[str, int]:
        counts = np.bincount(np.asarray(labels), minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts)}


@runtime_checkable
class Source(Protocol):
    """Random access: `source[i]` -> {'image': PIL image or HWC array, 'label': int, ...}."""

    info: DatasetInfo

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ArrayDataset:
    """Preprocessed in-memory examples: `images` NHWC float32 (already normalised), `labels` int32."""

    images: np.ndarray
    labels: np.ndarray
    info: DatasetInfo

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"images {self.images.shape} / labels {self.labels.shape}: expected NHWC and (N,)")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index])}

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Vectorised gather (no per-example work: the arrays are already preprocessed)."""
        idx = np.asarray(indices, np.int64)
        return {"image": self.images[idx], "label": self.labels[idx].astype(np.int32)}


def relabel(classes: Sequence[Hashable], available: Sequence[Hashable]) -> dict[Hashable, int]:
    """Map the chosen original classes, in the order given, to 0..k-1; reject unknown or repeated ones."""
    classes = list(classes)
    if not classes:
        raise ValueError("classes is empty")
    unknown = [c for c in classes if c not in set(available)]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; available: {list(available)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes has repeats: {classes}")
    return {c: i for i, c in enumerate(classes)}
