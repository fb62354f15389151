"""scikit-learn digits: shapes, split, relabelling, few-shot subsets, determinism."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from jtkd import data
from jtkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def test_shapes_dtypes_and_normalisation():
    ds = data.digits("train", image_size=32)
    assert ds.images.shape == (len(ds), 32, 32, 3) and ds.images.dtype == np.float32
    assert ds.labels.dtype == np.int32 and set(np.unique(ds.labels)) == set(range(10))
    assert ds.info.num_classes == 10 and ds.info.image_shape == (32, 32, 3)
    # undo Normalize: pixels are back in [0, 1] and the 3 channels are the same gray image
    x = ds.images * np.asarray(IMAGENET_STD, np.float32) + np.asarray(IMAGENET_MEAN, np.float32)
    assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6
    np.testing.assert_allclose(x[..., 0], x[..., 2], atol=1e-6)


def test_native_size_keeps_the_real_pixels():
    ds = data.digits("all", image_size=8, channels=1, mean=(0.0,), std=(1.0,))
    raw = load_digits()
    assert len(ds) == 1797
    np.testing.assert_allclose(ds.images[..., 0], raw.images / 16.0, atol=1e-7)
    np.testing.assert_array_equal(ds.labels, raw.target)


def test_split_is_stratified_disjoint_and_independent_of_classes_and_seed():
    tr, te = data.digits("train"), data.digits("test")
    a, b = tr.info.extra["source_indices"], te.info.extra["source_indices"]
    assert len(np.intersect1d(a, b)) == 0 and len(a) + len(b) == 1797
    counts = np.bincount(te.labels, minlength=10) / np.bincount(load_digits().target, minlength=10)
    np.testing.assert_allclose(counts, 0.25, atol=0.01)
    sub = data.digits("test", classes=[5, 6, 7, 8, 9], seed=123)
    assert set(sub.info.extra["source_indices"]) <= set(b)


def test_relabelling_is_explicit():
    ds = data.digits("train", classes=[5, 6, 7, 8, 9])
    assert ds.info.label_map == {5: 0, 6: 1, 7: 2, 8: 3, 9: 4}
    assert ds.info.class_names == ("5", "6", "7", "8", "9") and ds.info.num_classes == 5
    original = load_digits().target[ds.info.extra["source_indices"]]
    np.testing.assert_array_equal(ds.labels, original - 5)
    # the order given is the label order
    rev = data.digits("train", classes=[9, 2])
    orig = load_digits().target[rev.info.extra["source_indices"]]
    np.testing.assert_array_equal(rev.labels, np.where(orig == 9, 0, 1))


@pytest.mark.parametrize("bad", [[3, 3], [10], []])
def test_bad_classes_are_rejected(bad):
    with pytest.raises(ValueError):
        data.digits("train", classes=bad)


def test_few_shot_counts_and_seeding():
    a = data.digits("train", classes=[0, 1, 2], labels_per_class=5, seed=1)
    assert len(a) == 15 and np.bincount(a.labels).tolist() == [5, 5, 5]
    again = data.digits("train", classes=[0, 1, 2], labels_per_class=5, seed=1)
    np.testing.assert_array_equal(a.images, again.images)
    other = data.digits("train", classes=[0, 1, 2], labels_per_class=5, seed=2)
    assert not np.array_equal(a.info.extra["source_indices"], other.info.extra["source_indices"])
    train_idx = data.digits("train").info.extra["source_indices"]
    assert set(a.info.extra["source_indices"]) <= set(train_idx)  # never drawn from the test split
    with pytest.raises(ValueError, match="only"):
        data.digits("test", labels_per_class=1000)


def test_unnormalised_digits_can_be_augmented_per_example():
    raw = data.digits("train", classes=[1, 7], image_size=16, normalize_images=False)
    assert raw.images.min() >= 0 and raw.images.max() <= 1 and raw.info.extra["normalized"] is False
    kw = {"train": True, "num_epochs": 1, "seed": 0, "process_index": 0, "process_count": 1, "with_index": True}
    aug = next(data.batches(raw, 8, transform=data.TrainTransform(16, scale=(0.5, 1.0)), **kw))
    ref = data.digits("train", classes=[1, 7], image_size=16)
    plain = ref.images[aug["index"]]
    assert aug["image"].shape == plain.shape and aug["image"].dtype == np.float32
    assert not np.allclose(aug["image"], plain)  # cropped/flipped...
    # ...but normalised the same way: the background (0 before normalising) maps to -mean/std
    background = -np.asarray(IMAGENET_MEAN, np.float32) / np.asarray(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(aug["image"].min(axis=(1, 2)), np.broadcast_to(background, (8, 3)), atol=1e-5)
    # each example used its own (seed, epoch, index) stream
    i = int(aug["index"][3])
    want = data.TrainTransform(16, scale=(0.5, 1.0))(raw.images[i], data.example_rng(0, 0, i))
    np.testing.assert_array_equal(aug["image"][3], want)
