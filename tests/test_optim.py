"""Optimizers: schedules, decay masks, stages, freezing (bit-identical), layer-wise decay, clipping,
and SGD / AdamW against torch.optim."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from engine_helpers import HEAD, STAGES, Tiny, assert_bitwise_equal, dataset, init

from jtkd import finetune, models, optim, train
from jtkd.optim import OptimConfig


def test_warmup_cosine_and_step_schedules():
    cfg = OptimConfig(lr=0.1, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    s = optim.make_schedule(cfg, total_steps=20)
    np.testing.assert_allclose([s(0), s(2), s(4)], [0.0, 0.05, 0.1], rtol=1e-6)
    np.testing.assert_allclose(s(12), 0.01 + 0.09 * 0.5 * (1 + np.cos(np.pi * 8 / 16)), rtol=1e-5)
    np.testing.assert_allclose(s(20), 0.01, rtol=1e-5)
    step = optim.make_schedule(OptimConfig(lr=1.0, schedule="step", step_boundaries=(0.5, 0.75), step_factor=0.1), 100)
    np.testing.assert_allclose([step(49), step(50), step(74), step(75), step(99)], [1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)


def test_decay_mask_skips_norms_biases_and_embeddings():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)},
        "bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
        "pos_embedding": jnp.ones((1, 5, 4)),
        "fc": {"kernel": jnp.ones((4, 2))},
    }
    m = optim.decay_mask(params)
    assert m == {
        "conv": {"kernel": True, "bias": False},
        "bn": {"scale": False, "bias": False},
        "pos_embedding": False,
        "fc": {"kernel": True},
    }
    assert all(jax.tree.leaves(optim.decay_mask(params, decay_norms_and_biases=True, no_decay=())))


def test_resnet_stage_plan_and_masks_survive_sorted_dicts():
    params = jax.eval_shape(lambda: models.init("resnet18", jax.random.key(0), 32, num_classes=3))["params"]
    shuffled = dict(sorted(params.items()))  # what any jax.tree op returns: definition order is lost
    plan = optim.stage_plan(shuffled, model="resnet18")
    assert plan == [
        ["conv1", "bn1", "layer1_0", "layer1_1"],
        ["layer2_0", "layer2_1"],
        ["layer3_0", "layer3_1"],
        ["layer4_0", "layer4_1"],
    ]
    mask = optim.trainable_mask(shuffled, "partial", freeze_stages=2, model="resnet18")
    assert {k: all(jax.tree.leaves(v)) for k, v in mask.items()} == {
        k: not (k in ("conv1", "bn1") or k.startswith(("layer1", "layer2"))) for k in params
    }
    lin = optim.trainable_mask(shuffled, "linear", model="resnet18")
    assert [k for k, v in lin.items() if all(jax.tree.leaves(v))] == ["fc"]
    scales = optim.layer_lr_scales(shuffled, 0.5, model="resnet18")
    assert {k: jax.tree.leaves(v)[0] for k, v in scales.items()} == {
        "conv1": 0.0625,
        "bn1": 0.0625,
        "layer1_0": 0.0625,
        "layer1_1": 0.0625,
        "layer2_0": 0.125,
        "layer2_1": 0.125,
        "layer3_0": 0.25,
        "layer3_1": 0.25,
        "layer4_0": 0.5,
        "layer4_1": 0.5,
        "fc": 1.0,
    }
    # generic fallback: one stage per top-level module in definition order
    assert optim.stage_plan(shuffled, model="resnet18", stages=())[:3] == [["conv1"], ["bn1"], ["layer1_0"]]


def test_stage_errors_name_the_problem():
    params = jax.eval_shape(lambda: init(Tiny(3)))["params"]
    with pytest.raises(ValueError, match=r"match no stage regex"):
        optim.stage_plan(params, stages=("conv1|bn1",), head=HEAD)
    with pytest.raises(ValueError, match="several stages"):
        optim.stage_plan(params, stages=(".*", "conv1"), head=HEAD)
    with pytest.raises(ValueError, match="freeze_stages=4 but the model has 3 stages"):
        optim.trainable_mask(params, "partial", freeze_stages=4, stages=STAGES, head=HEAD)
    with pytest.raises(ValueError, match="unknown mode"):
        optim.trainable_mask(params, "half", head=HEAD)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_frozen_parameters_stay_bit_identical(name):
    """Several real train steps (weight decay, momentum, clipping on): frozen leaves never change a bit,
    hold no optimizer moments, and their BatchNorm statistics stay fixed in frozen_eval mode."""
    mesh = train.make_mesh(1)
    variables = jax.device_get(init(Tiny(3)))
    params = variables["params"]
    trainable = optim.trainable_mask(params, "partial", freeze_stages=2, stages=STAGES, head=HEAD)
    cfg = OptimConfig(optimizer=name, lr=0.5, weight_decay=0.1, grad_clip_norm=1.0, warmup_steps=1)
    tx = optim.make_optimizer(cfg, params, total_steps=5, trainable=trainable)
    frozen = frozenset({"conv1", "bn1", "layer1_0", "layer1_1"})
    loss = finetune.finetune_loss(bn="frozen_eval", trainable=trainable, frozen_modules=frozen)
    state = train.replicate(mesh, train.TrainState.create(Tiny(3, axis_name=train.AXIS).apply, variables, tx))
    step = train.make_train_step(mesh, loss)
    data = dataset(16)
    for i in range(4):
        state, _ = step(state, train.shard_batch(mesh, {k: v[i * 4 : (i + 1) * 4] for k, v in data.items()}))
    out = jax.device_get(state)
    for k in frozen:
        assert_bitwise_equal(out.params[k], params[k])
    for k in ("layer2_0", "fc"):
        assert not np.array_equal(out.params[k]["kernel"], params[k]["kernel"])
    assert_bitwise_equal(out.batch_stats["bn1"], variables["batch_stats"]["bn1"])  # frozen stage: inference BN
    assert_bitwise_equal(out.batch_stats["layer1_1"], variables["batch_stats"]["layer1_1"])
    # no moments were allocated for frozen leaves: the optimizer state holds only trainable-sized arrays
    n_train = sum(np.size(p) for k, p in params.items() if k not in frozen for p in jax.tree.leaves(p))
    moments = sum(np.size(x) for x in jax.tree.leaves(out.opt_state) if np.ndim(x) > 0)
    assert moments == n_train * (2 if name == "adamw" else 1)


def test_weight_average_follows_its_recursion_and_keeps_frozen_leaves_exact():
    """TrainState(ema_decay=d) holds e_t = e_{t-1} + (1 - d)(v_t - e_{t-1}) from e_0 = v_0 for the parameters and
    the BatchNorm statistics (timm's ModelEmaV2), checked against that recursion on the variables the steps
    produced; a frozen leaf is not copied into the average, whose frozen leaves are the leaf itself, bit for bit."""
    d = 0.8
    mesh = train.make_mesh(1)
    variables = init(Tiny(3))  # device arrays: the average must not share their buffers (the step donates both)
    host = jax.device_get(variables)
    trainable = optim.trainable_mask(host["params"], "partial", freeze_stages=2, stages=STAGES, head=HEAD)
    tx = optim.make_optimizer(OptimConfig(lr=0.5, weight_decay=0.1), host["params"], total_steps=5, trainable=trainable)
    state = train.TrainState.create(Tiny(3, axis_name=train.AXIS).apply, variables, tx, ema_decay=d, trainable=trainable)
    assert train.TrainState.create(Tiny(3).apply, variables, tx).averaged() is None
    frozen = {k for k, v in trainable.items() if not any(jax.tree.leaves(v))}
    assert frozen and set(state.ema["params"]) == set(host["params"]) - frozen
    state = train.replicate(mesh, state)
    step = train.make_train_step(mesh, finetune.finetune_loss(trainable=trainable))
    data = dataset(16)
    want = host
    for i in range(4):
        state, _ = step(state, train.shard_batch(mesh, {k: v[i * 4 : (i + 1) * 4] for k, v in data.items()}))
        want = jax.tree.map(lambda e, v: e + np.float32(1 - d) * (v - e), want, jax.device_get(state.variables))
    got = jax.device_get(state.averaged().variables)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert_bitwise_equal(got["params"]["layer1_0"], host["params"]["layer1_0"])  # frozen
    now = jax.device_get(state.variables)
    # the average lags the weights and the running statistics
    assert not np.allclose(got["params"]["fc"]["kernel"], now["params"]["fc"]["kernel"])
    assert not np.allclose(got["batch_stats"]["bn1"]["mean"], now["batch_stats"]["bn1"]["mean"])
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        OptimConfig(ema_decay=1.0).validate()
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        train.TrainState.create(Tiny(3).apply, variables, tx, ema_decay=1.5)


def test_weight_average_keeps_the_params_containers():
    """FrozenDict parameters and empty sub-dicts (a module without parameters) go through the averaged step, and
    `averaged()` has the parameters' own tree structure, with and without a trainable mask."""
    from flax.core import FrozenDict

    def loss_fn(params, state, batch, rng, extra):
        loss = (params["a"]["w"] * batch["x"].mean()).sum() + (params["b"]["w"] ** 2).sum()
        return loss, (state.batch_stats, {"loss": loss})

    mesh = train.make_mesh(1)
    step = train.make_train_step(mesh, loss_fn, donate=False)
    batch = train.shard_batch(mesh, {"x": np.ones((2, 3), np.float32)})
    for params in (FrozenDict({"a": {"w": np.ones(3, np.float32)}, "b": {"w": np.ones(2, np.float32)}}),
                   {"a": {"w": np.ones(3, np.float32)}, "b": {"w": np.ones(2, np.float32)}, "none": {}}):
        for trainable in (None, jax.tree.map(lambda _: True, dict(params)) | {"b": {"w": False}}):
            if trainable is not None and "none" in params:
                trainable["none"] = {}
            state = train.TrainState.create(None, {"params": params}, optax.sgd(0.1), ema_decay=0.5, trainable=trainable)
            state, _ = step(train.replicate(mesh, state), batch)
            avg = state.averaged()
            assert jax.tree.structure(avg.params) == jax.tree.structure(state.params)
            np.testing.assert_allclose(avg.params["a"]["w"], 1 - 0.5 * 0.1)  # the average of 1 and 1 - 0.1
            if trainable is not None:  # not averaged: the (here moving) weights themselves
                assert "b" not in state.ema["params"]
                np.testing.assert_array_equal(avg.params["b"]["w"], state.params["b"]["w"])


def test_layer_decay_scales_updates_and_clipping_bounds_them():
    params = {"a": {"kernel": jnp.ones((2, 2))}, "fc": {"kernel": jnp.ones((2, 2))}}
    grads = jax.tree.map(lambda p: 3.0 * jnp.ones_like(p), params)
    scales = optim.layer_lr_scales(params, 0.5, stages=("a",), head=("fc",))
    cfg = OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant")
    tx = optim.make_optimizer(cfg, params, total_steps=10, lr_scales=scales)
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u["fc"]["kernel"], -0.3)
    np.testing.assert_allclose(u["a"]["kernel"], -0.15)
    clipped = optim.make_optimizer(
        OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant", grad_clip_norm=1.0),
        params,
        total_steps=10,
    )
    u, _ = clipped.update(grads, clipped.init(params), params)
    np.testing.assert_allclose(optax.global_norm(u), 0.1, rtol=1e-6)  # |g| = 6 clipped to 1, times lr


def _torch_run(opt_name, w0, grads, **kw):
    w = torch.nn.Parameter(torch.tensor(w0))
    b = torch.nn.Parameter(torch.ones(3))
    if opt_name == "sgd":
        opt = torch.optim.SGD([{"params": [w]}, {"params": [b], "weight_decay": 0.0}], **kw)
    else:
        opt = torch.optim.AdamW([{"params": [w]}, {"params": [b], "weight_decay": 0.0}], **kw)
    for g in grads:
        w.grad, b.grad = torch.tensor(g), torch.ones(3)
        opt.step()
    return w.detach().numpy(), b.detach().numpy()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_matches_torch_optimizers(name):
    """Constant lr: our SGD (coupled L2, nesterov momentum) and AdamW (decoupled decay) are torch's,
    with biases (rank 1) excluded from decay as torch param groups would do."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((3, 3)).astype(np.float32)
    grads = [rng.standard_normal((3, 3)).astype(np.float32) for _ in range(5)]
    if name == "sgd":
        cfg = OptimConfig("sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, schedule="constant")
        ref = _torch_run("sgd", w0, grads, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    else:
        cfg = OptimConfig("adamw", lr=0.01, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.05, schedule="constant")
        ref = _torch_run("adamw", w0, grads, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    params = {"w": jnp.asarray(w0), "b": jnp.ones(3)}
    tx = optim.make_optimizer(cfg, params, total_steps=5)
    st = tx.init(params)
    for g in grads:
        u, st = tx.update({"w": jnp.asarray(g), "b": jnp.ones(3)}, st, params)
        params = optax.apply_updates(params, u)
    np.testing.assert_allclose(params["w"], ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["b"], ref[1], rtol=1e-5, atol=1e-6)


def test_all_frozen_is_an_error():
    params = {"a": jnp.ones(2)}
    with pytest.raises(ValueError, match="nothing to train"):
        optim.make_optimizer(OptimConfig(), params, total_steps=1, trainable={"a": False})
