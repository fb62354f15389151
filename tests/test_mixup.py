"""MixUp / CutMix (jtkd.mixup) against torchvision's transforms.v2.MixUp / CutMix: the same images and
soft targets for the same draw, torchvision's box for the same random numbers, the Beta weights' law, and a
sharded step that does not depend on the device count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torchvision.transforms import v2

from jtkd import mixup, train
from jtkd.finetune import FinetuneConfig

C = 13  # classes


def _batch(rows=6, h=11, w=13, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, h, w, 3)).astype(np.float32), rng.integers(0, C, rows)


def _torch(transform, images, labels, params):
    """torchvision's transform on NCHW images with `params` in place of its own draw."""
    transform.make_params = lambda flat_inputs: params
    img, target = transform(torch.from_numpy(images.transpose(0, 3, 1, 2)).clone(), torch.from_numpy(labels))
    return img.numpy().transpose(0, 2, 3, 1), target.numpy()


def _ours(images, labels, mix):
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    out, lam = mixup.mix_images(batch["image"], mixup.roll_rows(batch["image"]), mix)
    batch = {**batch, "image": out, "label_mix": mixup.roll_rows(batch["label"]), "mix_lam": jnp.full(len(labels), lam)}
    return np.asarray(out), np.asarray(mixup.targets(batch, C))


def test_mixup_equals_torchvision_for_the_same_lambda():
    images, labels = _batch()
    lam = 0.3125
    mix = mixup.Mix(jnp.asarray(False), jnp.float32(lam), tuple(jnp.int32(0) for _ in range(4)))
    got_img, got_t = _ours(images, labels, mix)
    want_img, want_t = _torch(v2.MixUp(alpha=0.2, num_classes=C), images, labels, {"lam": lam})
    np.testing.assert_allclose(got_img, want_img, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_t, want_t, rtol=0, atol=1e-7)
    assert not np.allclose(got_img, images)  # the images did change
    np.testing.assert_allclose(got_t.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_box_images_and_targets_equal_torchvision(seed):
    images, labels = _batch(h=11, w=13, seed=seed)
    h, w = images.shape[1:3]
    cm = v2.CutMix(alpha=1.0, num_classes=C)
    torch.manual_seed(seed)
    params = cm.make_params([torch.zeros(6, 3, h, w)])
    torch.manual_seed(seed)  # the same random numbers: lambda, then the centre's x, then y
    lam = float(cm._dist.sample(()))
    cx, cy = int(torch.randint(w, size=(1,))), int(torch.randint(h, size=(1,)))
    y1, y2, x1, x2 = (int(v) for v in mixup.cutmix_box(jnp.float32(lam), cy, cx, h, w))
    assert (x1, y1, x2, y2) == params["box"]
    mix = mixup.Mix(jnp.asarray(True), jnp.float32(lam), (y1, y2, x1, x2))
    got_img, got_t = _ours(images, labels, mix)
    want_img, want_t = _torch(cm, images, labels, params)
    np.testing.assert_array_equal(got_img, want_img)
    np.testing.assert_allclose(got_t, want_t, rtol=0, atol=1e-6)


def test_draws_follow_beta_and_pick_each_transform_half_the_time():
    a, n = 0.4, 4000
    draws = jax.vmap(lambda k: mixup.draw(k, a, 1.0, 11, 13))(jax.random.split(jax.random.key(0), n))
    cut = np.asarray(draws.cutmix)
    lam = np.asarray(draws.lam)[~cut]  # MixUp's lambda ~ Beta(0.4, 0.4): mean 1/2, variance 1/(4(2a + 1))
    assert abs(cut.mean() - 0.5) < 0.03
    assert abs(lam.mean() - 0.5) < 0.02 and abs(lam.var() - 1 / (4 * (2 * a + 1))) < 0.01
    lam_cut = np.asarray(draws.lam)[cut]  # CutMix's ~ Beta(1, 1) = uniform: variance 1/12
    assert abs(lam_cut.var() - 1 / 12) < 0.006
    y1, y2, x1, x2 = (np.asarray(v) for v in draws.box)
    assert (y1 >= 0).all() and (y2 <= 11).all() and (x1 >= 0).all() and (x2 <= 13).all() and (x2 >= x1).all()
    only_mixup = jax.vmap(lambda k: mixup.draw(k, a, 0.0, 11, 13))(jax.random.split(jax.random.key(1), 50))
    assert not np.asarray(only_mixup.cutmix).any()


def test_bfloat16_images_blend_in_float32_with_the_labels_lambda():
    images, labels = _batch()
    mix = mixup.Mix(jnp.asarray(False), jnp.float32(0.3), tuple(jnp.int32(0) for _ in range(4)))
    x16 = jnp.asarray(images, jnp.bfloat16)
    got, lam = mixup.mix_images(x16, mixup.roll_rows(x16), mix)
    x32 = x16.astype(jnp.float32)
    want = (mixup.roll_rows(x32) * (1 - jnp.float32(0.3)) + x32 * jnp.float32(0.3)).astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and float(lam) == np.float32(0.3)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_soft_target_cross_entropy_equals_torch():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, C)).astype(np.float32)
    q = rng.dirichlet(np.ones(C), 5).astype(np.float32)
    for eps in (0.0, 0.1):
        want_fn = torch.nn.CrossEntropyLoss(label_smoothing=eps)
        lt = torch.tensor(logits, requires_grad=True)
        want = want_fn(lt, torch.tensor(q))
        want.backward()
        got, grad = jax.value_and_grad(lambda z: train.cross_entropy(z, jnp.asarray(q), eps))(jnp.asarray(logits))
        np.testing.assert_allclose(got, want.item(), rtol=1e-6)
        np.testing.assert_allclose(grad, lt.grad.numpy(), rtol=1e-5, atol=1e-7)
    square = rng.standard_normal((C, C)).astype(np.float32)  # class indices stored as floats stay indices
    idx = rng.integers(0, C, C)
    np.testing.assert_allclose(train.cross_entropy(square, idx.astype(np.float32)), train.cross_entropy(square, idx))


class _Net(nn.Module):
    """conv + BatchNorm synchronised over the devices + linear head, in float64 (fast to compile)."""

    @nn.compact
    def __call__(self, x, train=False):
        f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), **f64)(x))
        x = nn.BatchNorm(use_running_average=not train, axis_name="data", **f64)(x)
        return nn.Dense(5, **f64)(x.mean((1, 2)))


def _run(num_devices, accum_steps=1):
    mesh = train.make_mesh(num_devices)
    model = _Net()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3), jnp.float64))
    state = train.TrainState.create(model.apply, variables, optax.sgd(0.1))
    step = train.make_train_step(
        mesh, train.classification_loss(label_smoothing=0.1), False, accum_steps,
        batch_transform=mixup.make_batch_transform(0.2, 1.0, axis_name=train.AXIS),
    )
    state = train.replicate(mesh, state)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(6):
        batch = {"image": rng.standard_normal((8, 16, 16, 3)), "label": rng.integers(0, 5, 8)}
        state, metrics = step(state, train.shard_batch(mesh, batch))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), np.array(losses)


@pytest.mark.usefixtures("four_devices")
def test_mixed_step_does_not_depend_on_the_device_count():
    """Four devices pair rows across shard boundaries (ppermute) exactly as one device's roll does: the same
    losses and weights over 6 steps in float64 (pairing rows within each shard fails this)."""
    with jax.enable_x64(True):
        p1, l1 = _run(1)
        p4, l4 = _run(4)
    np.testing.assert_allclose(l4, l1, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


def test_roll_rows_across_shards_is_the_global_roll(four_devices):
    mesh = train.make_mesh(4)
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    f = jax.jit(jax.shard_map(lambda a: mixup.roll_rows(a, train.AXIS), mesh=mesh,
                              in_specs=jax.P(train.AXIS), out_specs=jax.P(train.AXIS)))
    np.testing.assert_array_equal(f(x), np.roll(x, 1, axis=0))


def test_config_checks():
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        FinetuneConfig(mixup_alpha=-1.0).validate()
    with pytest.raises(ValueError, match="cached features"):
        FinetuneConfig(mode="linear", cutmix_alpha=1.0).validate()
    FinetuneConfig(mode="linear", cutmix_alpha=1.0, precompute_features=False).validate()
    assert mixup.make_batch_transform(0.0, 0.0) is None
    with pytest.raises(TypeError, match="floating-point images"):
        mixup.make_batch_transform(0.2, axis_name=None)(
            {"image": jnp.zeros((2, 4, 4, 3), jnp.uint8), "label": jnp.zeros(2, jnp.int32)}, jax.random.key(0)
        )
