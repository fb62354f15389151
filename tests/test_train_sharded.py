"""The data-parallel step on 4 (fake CPU) devices equals the same step on one device holding the
whole batch: gradients are averaged once (not N times), BatchNorm statistics are synchronised."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtkd import models, train

pytestmark = pytest.mark.usefixtures("four_devices")


def _run(num_devices: int, steps: int, dtype=jnp.float32):
    mesh = train.make_mesh(num_devices)
    model = models.create("resnet18", num_classes=5, axis_name=train.AXIS, dtype=dtype)
    variables = jax.tree.map(lambda a: a.astype(dtype), models.init(model, jax.random.key(0), 64))
    state = train.replicate(mesh, train.TrainState.create(model.apply, variables, optax.sgd(0.01, momentum=0.9)))
    step = train.make_train_step(mesh, train.classification_loss(), donate=False)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(steps):
        batch = {"image": rng.standard_normal((8, 64, 64, 3)).astype(dtype), "label": rng.integers(0, 5, 8)}
        state, metrics = step(state, train.shard_batch(mesh, batch))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def _assert_same(a, b, ha, hb, tol):
    for ma, mb in zip(ha, hb):
        for k in ("loss", "grad_norm", "accuracy"):
            np.testing.assert_allclose(ma[k], mb[k], rtol=tol, atol=tol, err_msg=k)
    for tree in ("params", "batch_stats"):
        la, lb = jax.tree.leaves(getattr(a, tree)), jax.tree.leaves(getattr(b, tree))
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=tree)


def test_sharded_step_equals_single_device_fp32():
    with jax.default_matmul_precision("highest"):
        one, h1 = _run(1, steps=1)
        four, h4 = _run(4, steps=1)
    _assert_same(one, four, h1, h4, 1e-5)
    assert int(four.step) == 1


def test_sharded_steps_equal_single_device_exactly_in_fp64():
    # Over several fp32 steps BatchNorm's backward amplifies reduction-order rounding (~1e-4 after 3
    # steps); in float64 the two runs must agree to rounding, which proves the maths is the same.
    with jax.enable_x64(True):
        one, h1 = _run(1, steps=3, dtype=jnp.float64)
        four, h4 = _run(4, steps=3, dtype=jnp.float64)
    _assert_same(one, four, h1, h4, 1e-10)


def test_one_device_step_has_no_gradient_all_reduce():
    # On one device the sum over devices is the identity, but XLA:CPU still runs an all-reduce as a copy
    # of every gradient; only BatchNorm's per-channel statistics and the metrics may remain.
    mesh = train.make_mesh(1)
    model = models.create("resnet18", num_classes=5, axis_name=train.AXIS)
    variables = models.init(model, jax.random.key(0), 32)
    state = train.replicate(mesh, train.TrainState.create(model.apply, variables, optax.sgd(0.01)))
    batch = train.shard_batch(mesh, {"image": np.zeros((2, 32, 32, 3), np.float32), "label": np.zeros(2, np.int32)})
    hlo = train.make_train_step(mesh, train.classification_loss()).lower(state, batch).compile().as_text()
    reduced = [
        int(np.prod([int(d) for d in dims.split(",") if d]))
        for line in hlo.splitlines() if " all-reduce(" in line
        for dims in re.findall(r"f32\[([\d,]*)\]", line.split(" all-reduce(")[0])
    ]
    largest_channel_count = 512
    assert reduced, "expected BatchNorm's statistics to be all-reduced"
    assert max(reduced) <= largest_channel_count, max(reduced)
