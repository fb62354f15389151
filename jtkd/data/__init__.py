"""Input pipeline: sources -> torchvision-style preprocessing -> batches -> sharded device arrays.

A batch is a dict of numpy arrays: 'image' float32 NHWC normalised, 'label' int32, plus 'mask'
(bool) on evaluation batches. Sources:

* `digits(split, classes=, labels_per_class=, image_size=)`: scikit-learn's digits, offline default.
* `tfds_source(name, split, data_dir=)`: tensorflow-datasets.
* `image_folder(path)`: class-per-sub-folder images; `eval_folder(path, train)` labels an evaluation
  folder with the training folder's map.

    train = data.image_folder("flowers/train")
    it = data.batches(train, 64, transform=data.TrainTransform(224), train=True, seed=0)
    for batch in data.prefetch_to_mesh(it, mesh):
        state, metrics = step(state, batch)
"""

from jtkd.data.digits import digits
from jtkd.data.folder import IMG_EXTENSIONS, BadImageError, FolderOptions, ImageFolder, eval_folder, image_folder, load_image
from jtkd.data.pipeline import batches, epoch_order, prefetch_to_mesh, steps_per_epoch
from jtkd.data.source import ArrayDataset, DatasetInfo, Source, Subset, few_shot, labels_of, stratified_split, subset
from jtkd.data.tfds_io import DatasetUnavailableError, TfdsSource, tfds_source
from jtkd.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    RandomErasing,
    TrainTransform,
    center_crop,
    example_rng,
    normalize,
    resize,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "ArrayDataset",
    "BadImageError",
    "DatasetInfo",
    "DatasetUnavailableError",
    "EvalTransform",
    "RandomErasing",
    "FolderOptions",
    "ImageFolder",
    "Source",
    "Subset",
    "TfdsSource",
    "TrainTransform",
    "batches",
    "center_crop",
    "digits",
    "epoch_order",
    "eval_folder",
    "example_rng",
    "few_shot",
    "image_folder",
    "labels_of",
    "load_image",
    "normalize",
    "prefetch_to_mesh",
    "resize",
    "steps_per_epoch",
    "stratified_split",
    "subset",
    "tfds_source",
]
