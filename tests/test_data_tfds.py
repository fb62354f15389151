"""tfds sources: mocked (offline) CIFAR-10 / Flowers-102, a real tiny data set prepared in both
file formats (array_record random access and the TFRecord in-memory fallback), clear errors."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jtkd import data

HOST = {"process_index": 0, "process_count": 1}


def test_mock_cifar10_gives_contract_batches():
    with tfds.testing.mock_data(num_examples=10):
        src = data.tfds_source("cifar10", "train")
        assert len(src) == 10 and src.info.num_classes == 10 and src.info.extra["backend"] == "data_source"
        batch_list = list(data.batches(src, 4, transform=data.EvalTransform(32, resize_size=32), **HOST))
    assert [b["mask"].sum() for b in batch_list] == [4, 4, 2]
    b = batch_list[0]
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and ((b["label"] >= 0) & (b["label"] < 10)).all()


def test_mock_flowers_variable_sizes_need_and_get_a_transform():
    with tfds.testing.mock_data(num_examples=6):
        src = data.tfds_source("oxford_flowers102", "test")
        assert src.info.num_classes == 102
        sizes = {src[i]["image"].size for i in range(len(src))}
        assert len(sizes) > 1  # the mock draws random image sizes, like the real data set
        with pytest.raises(ValueError, match="pass a transform"):
            next(data.batches(src, 3, **HOST))
        b = next(data.batches(src, 3, transform=data.TrainTransform(24), train=True, **HOST))
    assert b["image"].shape == (3, 24, 24, 3) and "mask" not in b


def test_unprepared_dataset_says_it_needs_a_download_or_data_dir(tmp_path):
    with pytest.raises(data.DatasetUnavailableError, match="internet") as err:
        data.tfds_source("cifar10", "train", data_dir=str(tmp_path))
    assert "data_dir" in str(err.value) and str(tmp_path) in str(err.value)


def test_unknown_name_and_feature():
    with pytest.raises(ValueError, match="no data set named"):
        data.tfds_source("no_such_dataset_xyz", "train")
    with tfds.testing.mock_data(num_examples=2), pytest.raises(ValueError, match="no feature 'photo'"):
        data.tfds_source("cifar10", "train", image_key="photo")


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """10 random RGB images of varying height, 3 named classes; built locally, no download."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(10):
            yield i, {"image": _tiny_image(i), "label": i % 3}


def _tiny_image(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (5 + i, 7, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    dirs = {}
    for fmt in ("array_record", "tfrecord"):
        dirs[fmt] = str(tmp_path_factory.mktemp(fmt))
        TinyShapes(data_dir=dirs[fmt], file_format=fmt).download_and_prepare()
    return dirs


@pytest.mark.parametrize("fmt,backend", [("array_record", "data_source"), ("tfrecord", "in_memory_encoded")])
def test_real_prepared_dataset_round_trips_exactly(prepared, fmt, backend):
    src = data.tfds_source("tiny_shapes", "train[:8]", data_dir=prepared[fmt])
    assert src.info.extra["backend"] == backend
    assert src.info.class_names == ("a", "b", "c") and len(src) == 8
    seen = set()
    for i in range(len(src)):
        ex = src[i]
        k = next(j for j in range(10) if _tiny_image(j).shape[:2] == (ex["image"].height, ex["image"].width))
        np.testing.assert_array_equal(np.asarray(ex["image"]), _tiny_image(k))  # PNG: lossless
        assert ex["label"] == k % 3
        seen.add(k)
    assert len(seen) == 8


def test_bad_split_of_a_prepared_dataset_is_not_reported_as_missing(prepared):
    with pytest.raises(Exception) as err:
        data.tfds_source("tiny_shapes", "validation", data_dir=prepared["array_record"])
    assert not isinstance(err.value, data.DatasetUnavailableError)
    assert "validation" in str(err.value)
