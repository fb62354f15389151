"""Preprocessing equals torchvision.transforms on real photos (scikit-image samples).

Tolerances: the PIL (uint8) path runs the same PIL resampling and the same float32 operations as
torchvision's PIL backend; measured difference 0.0 on both photos, asserted to 1e-6. The float path
matches torchvision's tensor backend (antialias=True): both use PIL's antialiased filter, with
different accumulation order; measured <= 4e-6 on [0, 1] images, asserted to 2e-5.
"""

import numpy as np
import pytest
import skimage.data
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torchvision.transforms import v2
from PIL import Image

from jtkd.data import transforms as jt

PHOTOS = {"astronaut": skimage.data.astronaut, "chelsea": skimage.data.chelsea}


def _torch_hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


@pytest.fixture(scope="module", params=sorted(PHOTOS))
def photo(request) -> Image.Image:
    return Image.fromarray(PHOTOS[request.param]())


@pytest.mark.parametrize("resize_size,crop", [(256, 224), (73, 64), (40, 48)])
def test_eval_transform_matches_torchvision_pil_path(photo, resize_size, crop):
    ref = T.Compose(
        [T.Resize(resize_size), T.CenterCrop(crop), T.ToTensor(), T.Normalize(jt.IMAGENET_MEAN, jt.IMAGENET_STD)]
    )
    want = _torch_hwc(ref(photo))
    got = jt.EvalTransform(crop, resize_size=resize_size)(photo)
    assert got.shape == want.shape == (crop, crop, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_eval_transform_default_resize_is_imagenet_convention():
    assert jt.EvalTransform(224).resize_to == 256


def test_resize_non_square_and_explicit_size_match_torchvision():
    img = Image.fromarray(skimage.data.chelsea())  # 300x451
    for size in (100, (50, 70), 451):
        want = np.asarray(TF.resize(img, size if isinstance(size, tuple) else [size]))
        got = np.asarray(jt.resize(img, size))
        np.testing.assert_array_equal(got, want)


def test_float_path_matches_torchvision_tensor_antialias(photo):
    x = np.asarray(photo, np.float32) / 255.0
    t = torch.from_numpy(x).permute(2, 0, 1)
    want = _torch_hwc(TF.center_crop(TF.resize(t, [96], antialias=True), [80]))
    got = jt.center_crop(jt.resize(x, 96), 80)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_train_transform_equals_torchvision_resized_crop_and_flip(photo):
    tr = jt.TrainTransform(64)
    for i in range(6):
        got = tr(photo, jt.example_rng(0, 0, i))
        rng = jt.example_rng(0, 0, i)  # replay the draws
        top, left, h, w = jt.random_resized_crop_params((photo.height, photo.width), rng, tr.scale, tr.ratio)
        flip = rng.uniform() < tr.flip_prob
        ref = TF.resized_crop(photo, top, left, h, w, [64, 64])
        ref = TF.hflip(ref) if flip else ref
        want = _torch_hwc(TF.normalize(TF.to_tensor(ref), jt.IMAGENET_MEAN, jt.IMAGENET_STD))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_random_resized_crop_params_stay_in_bounds_and_follow_scale():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        top, left, h, w = jt.random_resized_crop_params((120, 200), rng, (0.25, 0.5), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 200
        areas.append(h * w / (120 * 200))
    assert 0.2 < min(areas) and max(areas) < 0.55  # rounding widens the range slightly


def test_random_resized_crop_fallback_is_torchvision_central_crop():
    # a 10x1000 strip: no crop with ratio in [3/4, 4/3] fits, so both fall back to the centre
    img = Image.new("RGB", (1000, 10))
    assert jt.random_resized_crop_params((10, 1000), np.random.default_rng(0)) == T.RandomResizedCrop.get_params(
        img, [0.08, 1.0], [3 / 4, 4 / 3]
    )


def test_train_transform_is_deterministic_per_seed_epoch_index(photo):
    tr = jt.TrainTransform(32)
    a = tr(photo, jt.example_rng(3, 1, 7))
    np.testing.assert_array_equal(a, tr(photo, jt.example_rng(3, 1, 7)))
    assert not np.array_equal(a, tr(photo, jt.example_rng(3, 2, 7)))  # next epoch, new crop


def test_modes_and_bad_inputs():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = jt.to_float(jt.as_image(gray))
    assert out.shape == (8, 8, 3) and np.allclose(out[..., 0], out[..., 2])
    with pytest.raises(ValueError, match="channels"):
        jt.normalize(np.zeros((4, 4, 1), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        jt.as_image(np.zeros((4, 4, 3), np.int64))


def test_random_erasing_after_the_train_transform_equals_torchvision_erase(photo):
    tr = jt.TrainTransform(48, erase_prob=0.7)
    erased = 0
    for i in range(8):
        got = tr(photo, jt.example_rng(1, 0, i))
        rng = jt.example_rng(1, 0, i)  # replay the draws: crop, flip, then erasing's coin and box
        top, left, h, w = jt.random_resized_crop_params((photo.height, photo.width), rng, tr.scale, tr.ratio)
        ref = TF.resized_crop(photo, top, left, h, w, [48, 48])
        ref = TF.hflip(ref) if rng.uniform() < tr.flip_prob else ref
        ref = TF.normalize(TF.to_tensor(ref), jt.IMAGENET_MEAN, jt.IMAGENET_STD)
        if rng.uniform() < 0.7 and (box := jt.random_erasing_params((48, 48), rng)) is not None:
            ref = TF.erase(ref, *box, v=torch.tensor(0.0))
            erased += 1
        np.testing.assert_allclose(got, _torch_hwc(ref), rtol=0, atol=1e-6)
    assert 0 < erased < 8
    # without erasing the stream of draws is what it was: the same crops and flips as before
    np.testing.assert_array_equal(jt.TrainTransform(48)(photo, jt.example_rng(1, 0, 0)),
                                  jt.TrainTransform(48, erase_prob=0.0)(photo, jt.example_rng(1, 0, 0)))


def test_random_erasing_boxes_follow_scale_and_ratio_and_fall_back_like_torchvision():
    rng = np.random.default_rng(0)
    boxes = [jt.random_erasing_params((60, 90), rng) for _ in range(400)]
    assert all(b is not None for b in boxes)
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90 and h < 60 and w < 90
    areas = np.array([h * w for _, _, h, w in boxes]) / (60 * 90)
    aspects = np.array([h / w for _, _, h, w in boxes])
    assert 0.01 < areas.min() and areas.max() < 0.37 and 0.25 < aspects.min() and aspects.max() < 4
    # no box fits (area at least 90% of a 3x3 image): torchvision erases nothing, and so does this
    tv = v2.RandomErasing(p=1.0, scale=(0.9, 1.0)).make_params([torch.zeros(3, 3, 3)])
    assert tv["v"] is None and jt.random_erasing_params((3, 3), rng, scale=(0.9, 1.0)) is None
    x = np.ones((3, 3, 3), np.float32)
    assert jt.RandomErasing(1.0, scale=(0.9, 1.0))(x, rng) is x
    batch = {"image": np.ones((16, 20, 20, 3), np.float32), "label": np.arange(16)}
    out = jt.RandomErasing(0.5).on_batch(batch, np.random.default_rng(2))
    hit = (out["image"] == 0).any(axis=(1, 2, 3))
    assert 0 < hit.sum() < 16 and np.array_equal(out["label"], batch["label"]) and (batch["image"] == 1).all()
    with pytest.raises(ValueError, match="probability must be in"):
        jt.RandomErasing(1.5)
