"""What every data source shares: metadata, the random-access protocol, in-memory arrays."""

from __future__ import annotations

import dataclasses
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


def stratified_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: each class keeps round(test_fraction * n_c) examples for test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(test_fraction * idx.size)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def few_shot_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` examples of each label, drawn without replacement (sorted)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if per_class > idx.size:
            raise ValueError(f"labels_per_class={per_class} but class {c} has only {idx.size} examples in this split")
        chosen.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


@dataclass(frozen=True)
class Subset:
    """Examples `indices` of `source` (re-indexed 0..len-1); labels and class map unchanged."""

    source: Any
    indices: np.ndarray
    info: DatasetInfo

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.source.labels)[self.indices]

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[int(self.indices[index])]


def labels_of(source: Any) -> np.ndarray:
    """All labels of a source that keeps them in memory (ArrayDataset, ImageFolder, Subset)."""
    labels = getattr(source, "labels", None)
    if labels is None:
        raise TypeError(
            f"{type(source).__name__} does not hold its labels in memory; splitting it would decode every example"
        )
    return np.asarray(labels)


def subset(source: Any, indices: Sequence[int] | np.ndarray, split: str | None = None) -> Any:
    """The examples `indices` of `source`; an ArrayDataset stays an ArrayDataset (vectorised batches)."""
    idx = np.asarray(indices, np.int64)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= len(source))):
        raise IndexError(f"indices must be 1-D within [0, {len(source)})")
    info = dataclasses.replace(source.info, num_examples=int(idx.size), split=split or source.info.split)
    if isinstance(source, ArrayDataset):
        return ArrayDataset(source.images[idx], source.labels[idx], info)
    return Subset(source, idx, info)


def stratified_split(source: Any, test_fraction: float, seed: int = 0) -> tuple[Any, Any]:
    """(train, test) subsets with round(test_fraction * n_c) test examples of each class c."""
    train, test = stratified_indices(labels_of(source), test_fraction, seed)
    base = source.info.split
    return subset(source, train, f"{base}[train]"), subset(source, test, f"{base}[test]")


def few_shot(source: Any, labels_per_class: int, seed: int = 0) -> Any:
    """`labels_per_class` examples of every label present, drawn with `seed` (errors if a class has fewer)."""
    chosen = few_shot_indices(labels_of(source), labels_per_class, seed)
    return subset(source, chosen, f"{source.info.split}[{labels_per_class}-shot]")
