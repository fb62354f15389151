"""tensorflow-datasets as a random-access source, without TensorFlow where possible.

Datasets prepared in the array_record format are read through `tfds.data_source` (random access,
no TensorFlow). Datasets prepared as TFRecord (what `tfds.load` does by default) are read once
through `tf.data` into memory *still encoded* (JPEG/PNG bytes; CIFAR-10 is ~ 0.1 GB) and decoded
per example by the input workers; for data sets larger than memory, prepare them with
`tfds build NAME --file_format=array_record`.

Nothing is downloaded unless `download=True` (which needs internet); a missing data set raises
`DatasetUnavailableError` saying what to do.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from jtkd.data.folder import to_rgb
from jtkd.data.source import DatasetInfo


class DatasetUnavailableError(RuntimeError):
    """The data set is not prepared in `data_dir` and was not allowed (or able) to download."""


def _image(value: Any) -> Image.Image:
    if isinstance(value, (bytes, np.bytes_)):
        img = Image.open(io.BytesIO(bytes(value)))
        img.load()
        return to_rgb(img)
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image from tfds, got {arr.dtype} {arr.shape}")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return to_rgb(Image.fromarray(arr, "RGB" if arr.shape[-1] == 3 else "RGBA"))
    raise ValueError(f"unsupported image shape {arr.shape}")


@dataclass(frozen=True)
class TfdsSource:
    """`self[i]` -> {'image': RGB PIL image, 'label': int}; backed by a tfds data source or by
    an in-memory list of (encoded image, label)."""

    records: Any  # Sequence[dict] (tfds data source) or list[tuple[bytes, int]]
    info: DatasetInfo
    image_key: str = "image"
    label_key: str = "label"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[int(index)]
        if isinstance(rec, tuple):
            return {"image": _image(rec[0]), "label": int(rec[1])}
        return {"image": _image(rec[self.image_key]), "label": int(rec[self.label_key])}


def _unavailable(name: str, split: str, data_dir: str | None, cause: BaseException) -> DatasetUnavailableError:
    where = data_dir or "the default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    return DatasetUnavailableError(
        f"tfds data set {name!r} (split {split!r}) is not prepared in {where} and is not available offline. "
        f"Download it once with tfds_source(..., download=True) on a machine with internet access "
        f"(or `tfds build {name} --file_format=array_record`), or pass data_dir= pointing at a prepared copy. "
        f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
    )


def tfds_source(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    image_key: str = "image",
    label_key: str = "label",
) -> TfdsSource:
    """A tfds split (any tfds split syntax, e.g. 'train[:90%]') as a random-access source."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"tfds has no data set named {name!r} (see tfds.list_builders())") from e
    if download:
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:
            raise _unavailable(name, split, data_dir, e) from e

    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(f"tfds {name!r} has no feature {key!r}; features: {list(features)}")
    label_feature = features[label_key]
    class_names: Sequence[str] = getattr(label_feature, "names", None) or [
        str(i) for i in range(getattr(label_feature, "num_classes", 0))
    ]
    if not class_names:
        raise ValueError(f"tfds {name!r} feature {label_key!r} is not a ClassLabel; cannot name classes")

    records: Any
    try:
        records = builder.as_data_source(split)
        backend = "data_source"
    except Exception as e:
        if not builder.is_prepared():
            raise _unavailable(name, split, data_dir, e) from e
        if not isinstance(e, NotImplementedError):  # e.g. a bad split name: tfds's own message says it
            raise
        records = _read_encoded(builder, split, image_key, label_key)  # prepared as TFRecord: no random access
        backend = "in_memory_encoded"

    info = DatasetInfo(
        name=name,
        split=split,
        num_examples=len(records),
        class_names=tuple(class_names),
        label_map={i: i for i in range(len(class_names))},
        image_shape=None,
        extra={"backend": backend},
    )
    return TfdsSource(records, info, image_key, label_key)


def _read_encoded(builder: Any, split: str, image_key: str, label_key: str) -> list[tuple[bytes, int]]:
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()}, shuffle_files=False)
    out = []
    for ex in tqdm(tfds.as_numpy(ds), desc=f"reading {builder.name}/{split}", leave=False):
        out.append((bytes(ex[image_key]), int(ex[label_key])))
    return out
