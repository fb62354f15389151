"""image_folder: torchvision's layout and labels, mode conversion, and the failure modes (issue 6)."""

import io
import os
import warnings

import numpy as np
import pytest
import torchvision
from PIL import Image

from jtkd import data
from jtkd.data import BadImageError


def _save(path, img, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, fmt)


def _rgb(seed, size=(12, 10)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture()
def good_root(tmp_path):
    root = tmp_path / "ds"
    _save(str(root / "dog" / "a.jpg"), _rgb(0))
    _save(str(root / "dog" / "nested" / "b.png"), _rgb(1).convert("L"))  # grayscale
    _save(str(root / "cat" / "c.png"), _rgb(2).convert("RGBA"))
    pal = _rgb(3).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0
    _save(str(root / "cat" / "d.png"), pal)
    _save(str(root / "bird" / "e.bmp"), _rgb(4))
    deep = Image.fromarray(np.full((6, 5), 65535, np.uint16))  # 16-bit gray, saturated white
    _save(str(root / "bird" / "f.png"), deep)
    (root / "bird" / ".DS_Store").write_bytes(b"\0\1junk")  # hidden: ignored
    (root / "README.txt").write_text("files in the root are ignored")
    return root


def test_layout_and_labels_match_torchvision_imagefolder(good_root):
    ds = data.image_folder(good_root)
    ref = torchvision.datasets.ImageFolder(str(good_root))
    assert ds.info.class_names == tuple(ref.classes) == ("bird", "cat", "dog")
    assert ds.info.label_map == ref.class_to_idx
    assert sorted(zip(ds.files, ds.labels.tolist())) == sorted((p, t) for p, t in ref.samples)
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["image"].mode == "RGB"
        ref_img, ref_label = ref[ref.samples.index((ds.files[i], int(ds.labels[i])))]
        assert ex["label"] == ref_label
        if not ds.files[i].endswith("f.png"):  # torchvision clips 16-bit gray; we rescale
            np.testing.assert_array_equal(np.asarray(ex["image"]), np.asarray(ref_img))


def test_sixteen_bit_gray_is_rescaled_not_clipped(good_root):
    ds = data.image_folder(good_root)
    img = np.asarray(ds[ds.files.index(str(good_root / "bird" / "f.png"))]["image"])
    assert img.shape == (6, 5, 3) and (img == 255).all()


def test_class_subset_and_explicit_map(good_root):
    sub = data.image_folder(good_root, classes=["dog", "bird"])
    assert sub.info.label_map == {"dog": 0, "bird": 1} and len(sub) == 4
    fixed = data.image_folder(good_root, classes={"cat": 2, "dog": 0, "bird": 1})
    assert fixed.info.class_names == ("dog", "bird", "cat")
    assert all(fixed.labels[i] == 2 for i, f in enumerate(fixed.files) if "/cat/" in f)
    with pytest.raises(ValueError, match="unknown classes"):
        data.image_folder(good_root, classes=["dog", "horse"])
    with pytest.raises(ValueError, match="0..1"):
        data.image_folder(good_root, classes={"dog": 0, "cat": 5})


@pytest.mark.parametrize(
    "name,content",
    [("corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg" * 3), ("empty.png", b""), ("notes.txt", b"hello")],
)
def test_bad_file_error_names_the_file_or_is_skipped_with_warning(good_root, name, content):
    bad = good_root / "cat" / name
    bad.write_bytes(content)
    with pytest.raises(BadImageError) as err:
        data.image_folder(good_root)
    assert str(bad) in str(err.value) and err.value.path == str(bad)
    with pytest.warns(UserWarning, match="skipped 1 bad file") as rec:
        ds = data.image_folder(good_root, on_bad="skip")
    assert str(bad) in str(rec[0].message)
    assert ds.info.skipped == (str(bad),) and str(bad) not in ds.files and len(ds) == 6
    assert ds.info.label_map == {"bird": 0, "cat": 1, "dog": 2}  # labels unchanged


def test_truncated_jpeg_is_caught_by_full_validation_or_named_at_decode(good_root):
    buf = io.BytesIO()
    _rgb(9, (64, 64)).save(buf, "JPEG")
    bad = good_root / "dog" / "truncated.jpg"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImageError, match="truncated.jpg"):
        data.image_folder(good_root, validate="full")
    ds = data.image_folder(good_root)  # the header check cannot see the missing data...
    with pytest.raises(BadImageError, match="truncated.jpg"):  # ...decoding names the file
        list(
            data.batches(
                ds, 4, transform=data.EvalTransform(8, resize_size=8), num_workers=2, process_count=1, process_index=0
            )
        )


def test_empty_class_folder(good_root):
    os.makedirs(good_root / "ant")
    with pytest.raises(ValueError, match=r"\['ant'\].*no usable images"):
        data.image_folder(good_root)
    with pytest.warns(UserWarning, match="dropped empty classes"):
        dropped = data.image_folder(good_root, on_empty="drop")
    assert dropped.info.label_map == {"bird": 0, "cat": 1, "dog": 2}
    with pytest.warns(UserWarning, match="labels stay unused"):
        kept = data.image_folder(good_root, on_empty="keep")
    assert kept.info.label_map == {"ant": 0, "bird": 1, "cat": 2, "dog": 3} and kept.info.num_classes == 4
    assert 0 not in kept.labels
    with pytest.raises(ValueError, match="renumber"):
        data.image_folder(good_root, classes={"ant": 0, "bird": 1}, on_empty="drop")


def test_class_emptied_by_skipping_counts_as_empty(tmp_path):
    _save(str(tmp_path / "a" / "x.png"), _rgb(0))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"\['b'\]"):
            data.image_folder(tmp_path, on_bad="skip")


def test_missing_or_flat_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.image_folder(tmp_path / "nope")
    _save(str(tmp_path / "img.png"), _rgb(0))
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.image_folder(tmp_path)


def test_threaded_decode_matches_serial(good_root):
    ds = data.image_folder(good_root)
    kw = {
        "transform": data.TrainTransform(16),
        "train": True,
        "num_epochs": 2,
        "seed": 5,
        "process_index": 0,
        "process_count": 1,
    }
    serial = list(data.batches(ds, 3, num_workers=0, **kw))
    threaded = list(data.batches(ds, 3, num_workers=3, prefetch=3, **kw))
    assert len(serial) == len(threaded) == 4
    for a, b in zip(serial, threaded):
        assert a.keys() == b.keys() == {"image", "label"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_stratified_split_and_few_shot_of_a_folder(tmp_path):
    for c in ("a", "b", "c"):
        for i in range(6):
            _save(str(tmp_path / c / f"{i}.png"), _rgb(i, (4, 4)))
    ds = data.image_folder(tmp_path)
    tr, te = data.stratified_split(ds, 0.5, seed=0)
    assert np.bincount(tr.labels).tolist() == np.bincount(te.labels).tolist() == [3, 3, 3]
    assert set(tr.indices).isdisjoint(te.indices) and len(tr) + len(te) == len(ds)
    assert tr.info.label_map == ds.info.label_map and tr.info.num_examples == 9
    shot = data.few_shot(tr, 2, seed=1)
    assert np.bincount(shot.labels).tolist() == [2, 2, 2]
    for k in range(len(shot)):  # a subset of a subset indexes through both
        want = ds[int(tr.indices[shot.indices[k]])]
        assert shot[k]["label"] == want["label"] and shot[k]["image"].tobytes() == want["image"].tobytes()
    np.testing.assert_array_equal(data.few_shot(tr, 2, seed=1).indices, shot.indices)
    assert shot[0]["label"] == shot.labels[0]
    b = next(data.batches(shot, 6, transform=data.EvalTransform(4, resize_size=4), process_index=0, process_count=1))
    np.testing.assert_array_equal(b["label"], shot.labels)
    with pytest.raises(ValueError, match="only 3"):
        data.few_shot(tr, 4)


def test_subset_of_arrays_stays_vectorised_and_tfds_labels_are_not_scanned():
    digits = data.digits("test", image_size=8)
    sub = data.subset(digits, [5, 1, 7])
    assert isinstance(sub, data.ArrayDataset) and len(sub) == 3 and sub.info.num_examples == 3
    np.testing.assert_array_equal(sub.images, digits.images[[5, 1, 7]])
    with pytest.raises(IndexError):
        data.subset(digits, [450])
    fake = data.TfdsSource([], data.DatasetInfo("x", "train", 0, ("a",), {0: 0}))
    with pytest.raises(TypeError, match="labels in memory"):
        data.labels_of(fake)


def _folders(root, classes, per_class=2):
    for c in classes:
        for i in range(per_class):
            _save(str(root / c / f"{i}.png"), _rgb(sum(map(ord, c)) * 10 + i, (4, 4)))
    return root


def test_eval_folder_takes_the_training_labels(tmp_path):
    """An eval folder missing a class keeps the training labels: its sorted position would shift 'yak' from
    2 to 1. A folder the training data has no class for is an error, not a label that means another class."""
    train = data.image_folder(_folders(tmp_path / "train", ["cat", "dog", "yak"]))
    val = _folders(tmp_path / "val", ["cat", "yak"])
    with pytest.raises(ValueError, match=r"no folder for training class\(es\) \['dog'\]"):
        data.eval_folder(val, train.info.class_names)
    with pytest.warns(UserWarning, match=r"\['dog'\].*unused"):
        ev = data.eval_folder(val, train.info.class_names, on_empty="keep", split="val")
    assert ev.info.class_names == ("cat", "dog", "yak") and ev.info.label_map == train.info.label_map
    assert {os.path.basename(os.path.dirname(f)): int(y) for f, y in zip(ev.files, ev.labels)} == {"cat": 0, "yak": 2}
    assert data.image_folder(val).info.label_map["yak"] == 1  # what positional pairing would have used
    _folders(tmp_path / "val", ["zebra"])
    with pytest.raises(ValueError, match=r"\['zebra'\].*no label"):
        data.eval_folder(val, train.info.class_names, on_empty="keep")


def test_finetune_cli_refuses_an_eval_folder_with_other_classes(tmp_path):
    """Same number of classes, different names: before, `val/zebra` was scored as `train/yak`."""
    from experiments import finetune

    _folders(tmp_path / "train", ["cat", "dog", "yak"])
    _folders(tmp_path / "val", ["cat", "dog", "zebra"])
    job = finetune.FinetuneJob(data=f"folder:{tmp_path / 'train'}", eval_data=f"folder:{tmp_path / 'val'}")
    with pytest.raises(ValueError, match="zebra"):
        finetune.load_data(job, 0)
    (tmp_path / "train" / "yak" / "0.png").unlink()
    (tmp_path / "train" / "yak" / "1.png").write_bytes(b"not a png")
    bad = finetune.FinetuneJob(data=f"folder:{tmp_path / 'train'}")
    with pytest.raises(BadImageError, match="--folder.on_bad skip"):
        finetune.load_data(bad, 0)
    skip = finetune.jconfig.parse_args(bad, ["--folder.on_bad", "skip", "--folder.on_empty", "drop"])
    with pytest.warns(UserWarning):
        tr, ev, n = finetune.load_data(skip, 0)
    assert n == 2 and tr.info.class_names == ("cat", "dog") and ev is None
