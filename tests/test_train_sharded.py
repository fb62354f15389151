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


def _run(num_devices: int, steps: int, dtype=jnp.float32, size: int = 64, accum_steps: int = 1, train_mode: bool = True):
    mesh = train.make_mesh(num_devices)
    model = models.create("resnet18", num_classes=5, axis_name=train.AXIS, dtype=dtype)
    variables = jax.tree.map(lambda a: a.astype(dtype), models.init(model, jax.random.key(0), size))
    state = train.replicate(mesh, train.TrainState.create(model.apply, variables, optax.sgd(0.01, momentum=0.9)))
    step = train.make_train_step(mesh, train.classification_loss(train_mode=train_mode), False, accum_steps)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(steps):
        batch = {"image": rng.standard_normal((8, size, size, 3)).astype(dtype), "label": rng.integers(0, 5, 8)}
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


# ------------------------------------------------------------------------------ gradient accumulation
def test_accumulated_steps_do_not_depend_on_the_device_count():
    """Micro-batch j is every k-th row of the global batch, so 4 devices x 2 micro-batches of 1 row compute
    what one device does with 2 micro-batches of 4 rows (BatchNorm synchronised over the devices). In float64,
    as BatchNorm over 4 rows of 1x1 maps (layer4 at 32 px) amplifies float32 reduction-order rounding."""
    with jax.enable_x64(True):
        one, h1 = _run(1, 2, jnp.float64, size=32, accum_steps=2)
        four, h4 = _run(4, 2, jnp.float64, size=32, accum_steps=2)
        full, hf = _run(1, 1, jnp.float64, size=32)
    _assert_same(one, four, h1, h4, 1e-10)
    # and it is not the full-batch step: train-mode BatchNorm normalises each micro-batch by its own statistics
    assert not np.allclose(h1[0]["loss"], hf[0]["loss"], rtol=1e-4)


def test_accumulated_step_sums_gradients_over_devices_once():
    """The k micro-batches' gradients are all-reduced once after the scan (as torch DDP's no_sync), not in
    each micro-batch: inside the loop only BatchNorm's per-channel statistics (and metrics) cross devices."""
    mesh = train.make_mesh(4)
    model = models.create("resnet18", num_classes=5, axis_name=train.AXIS)
    state = train.replicate(mesh, train.TrainState.create(model.apply, models.init(model, jax.random.key(0), 32),
                                                          optax.sgd(0.01)))
    batch = train.shard_batch(mesh, {"image": np.zeros((8, 32, 32, 3), np.float32), "label": np.zeros(8, np.int32)})
    hlo = train.make_train_step(mesh, train.classification_loss(), accum_steps=2).lower(state, batch).compile().as_text()

    def sizes(lines):
        return [int(np.prod([int(d) for d in dims.split(",") if d]))
                for line in lines for dims in re.findall(r"f32\[([\d,]*)\]", line.split(" all-reduce(")[0])]

    reduces = [line for line in hlo.splitlines() if " all-reduce(" in line]
    in_loop = sizes(line for line in reduces if "while/body" in line)
    assert in_loop and max(in_loop) <= 512, max(in_loop)  # BatchNorm statistics: at most 512 channels
    assert max(sizes(reduces)) >= 512 * 512 * 9  # the gradients (layer4's 3x3 kernels), once, outside the loop


def test_accumulation_with_inference_mode_batchnorm_equals_the_full_batch_step():
    """Without batch statistics every row's gradient is independent of the others: the mean over 4 micro-batches
    of their mean gradients is the full batch's (a missing or doubled 1/k would be off by 4x)."""
    with jax.default_matmul_precision("highest"):
        acc, ha = _run(2, 2, size=32, accum_steps=4, train_mode=False)
        full, hf = _run(2, 2, size=32, train_mode=False)
    _assert_same(acc, full, ha, hf, 2e-5)


def test_accumulation_rejects_a_batch_it_cannot_split():
    mesh = train.make_mesh(2)

    def loss_fn(params, state, batch, rng, extra):
        loss = params["w"].sum() * batch["x"].mean()
        return loss, ({}, {"loss": loss})

    state = train.replicate(mesh, train.TrainState.create(None, {"params": {"w": np.ones(3, np.float32)}}, optax.sgd(0.1)))
    step = train.make_train_step(mesh, loss_fn, False, accum_steps=3)
    with pytest.raises(ValueError, match="accum_steps=3 does not divide the 4 rows of a device's batch"):
        step(state, train.shard_batch(mesh, {"x": np.ones((8, 2), np.float32)}))
    with pytest.raises(ValueError, match="accum_steps must be >= 1"):
        train.make_train_step(mesh, loss_fn, accum_steps=0)
    # checked up front by the fine-tuning and distillation setups, before models are built
    train.check_batch_size(mesh, 12, 3)
    with pytest.raises(ValueError, match=r"batch_size=8 gives 4 rows per device, which accum_steps=3 .* multiple of 6"):
        train.check_batch_size(mesh, 8, 3)
    with pytest.raises(ValueError, match="batch_size=7 does not split over 2 devices"):
        train.check_batch_size(mesh, 7)
    from jtkd.finetune import FinetuneConfig, Finetuner
    from jtkd.loop import LoopConfig

    cfg = FinetuneConfig(mode="scratch", batch_size=8, image_size=32, loop=LoopConfig(accum_steps=4))
    with pytest.raises(ValueError, match="batch_size=8 gives 2 rows per device"):
        Finetuner(cfg, models.init("resnet18", jax.random.key(0), 32, num_classes=3), 3, train.make_mesh(4))


def test_accumulated_step_equals_torch_gradient_accumulation():
    """torch's recipe, `(loss / k).backward()` on each of k micro-batches then one `optimizer.step()`, from a
    converted model with random BatchNorm statistics (13 classes, 37x41 px): the same loss, weights and running
    statistics (updated k times) after the step."""
    import torch

    from converters import parity
    from converters.torchvision import convert, flax_module, to_torch

    k, lr = 3, 0.1
    torch_model = parity.torch_model("resnet18", num_classes=13, seed=4)
    variables = convert("resnet18", torch_model.state_dict())
    x = parity.probe_batch(6, 37, 41, seed=5)
    y = np.random.default_rng(6).integers(0, 13, 6)

    mesh = train.make_mesh(1)
    module = flax_module("resnet18", variables, axis_name=train.AXIS)
    state = train.replicate(mesh, train.TrainState.create(module.apply, variables, optax.sgd(lr)))
    step = train.make_train_step(mesh, train.classification_loss(), False, accum_steps=k)
    with jax.default_matmul_precision("highest"):
        state, metrics = step(state, train.shard_batch(mesh, {"image": x.transpose(0, 2, 3, 1), "label": y}))

    torch_model.train()
    opt = torch.optim.SGD(torch_model.parameters(), lr=lr)
    losses = []
    for j in range(k):  # micro-batch j: rows j, j + k, ... (jtkd.train's docstring)
        loss = torch.nn.functional.cross_entropy(torch_model(torch.from_numpy(x[j::k])), torch.from_numpy(y[j::k]))
        (loss / k).backward()
        losses.append(loss.item())
    opt.step()

    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
    before, got = to_torch("resnet18", variables), to_torch("resnet18", jax.device_get(state.variables))
    moved = 0
    for key, want in torch_model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_allclose(got[key].numpy(), want.numpy(), atol=2e-5, rtol=1e-4, err_msg=key)
            moved += not torch.equal(got[key], before[key])
    assert moved > len(got) // 2
