"""Multi-task learning: shared backbone, named heads, weighted losses, partial labels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision
from engine_helpers import Tiny, dataset

from jtkd import models, train
from jtkd.loop import ArraySource, EvalSource, LoopConfig, Trainer
from jtkd.multitask import (
    MultiTaskModel, multitask_eval, multitask_loss, multitask_model, multitask_variables, stack_labels,
)

TASKS = (("digit", 3), ("parity", 2))


def _model(axis_name=None):
    return MultiTaskModel(Tiny(num_classes=0, axis_name=axis_name), TASKS)


def _data(n, seed):
    d = dataset(n, seed=seed)
    return {"image": d["image"], **stack_labels({"digit": d["label"], "parity": d["label"] % 2})}


def _state(model, tx=optax.sgd(0.1)):
    v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    return train.TrainState.create(model.apply, jax.device_get(dict(v)), tx)


def test_outputs_and_parameter_layout():
    model = _model()
    state = _state(model)
    assert set(state.params) == {"backbone", "head_digit", "head_parity"}
    out = model.apply(state.variables, jnp.zeros((5, 8, 8, 3)))
    assert {k: v.shape for k, v in out.items()} == {"digit": (5, 3), "parity": (5, 2)}
    with pytest.raises(ValueError, match="num_classes=0"):
        MultiTaskModel(Tiny(num_classes=3), TASKS).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_weighted_loss_formula_and_gradient_routing():
    model = _model()
    state = _state(model)
    batch = _data(6, seed=0)
    batch["label/parity"][:2] = -1  # unlabelled for this task
    loss_fn = multitask_loss({"digit": 1.0, "parity": 0.0}, train_mode=False)
    (loss, (_, metrics)), grads = jax.value_and_grad(
        lambda p: loss_fn(p, state, batch, jax.random.key(0), None), has_aux=True
    )(state.params)
    out = model.apply(state.variables, batch["image"])
    ce = lambda lg, y: -np.take_along_axis(np.asarray(jax.nn.log_softmax(lg)), y[:, None], 1)[:, 0]
    np.testing.assert_allclose(metrics["loss/digit"], ce(out["digit"], batch["label/digit"]).mean(), rtol=1e-6)
    np.testing.assert_allclose(
        metrics["loss/parity"], ce(out["parity"][2:], batch["label/parity"][2:]).mean(), rtol=1e-6
    )
    np.testing.assert_allclose(loss, metrics["loss/digit"], rtol=1e-6)
    # a zero-weight task's head gets no gradient; the other head and the backbone do
    assert not any(np.any(g) for g in jax.tree.leaves(grads["head_parity"]))
    assert all(np.any(g) for g in jax.tree.leaves(grads["head_digit"]))
    w = multitask_loss({"digit": 0.3, "parity": 2.0}, train_mode=False)(state.params, state, batch, None, None)[0]
    np.testing.assert_allclose(w, 0.3 * metrics["loss/digit"] + 2.0 * metrics["loss/parity"], rtol=1e-6)
    with pytest.raises(KeyError, match=r"tasks \['colour'\] the model does not have"):
        multitask_loss({"colour": 1.0}, train_mode=False)(state.params, state, batch, None, None)
    no_parity = {k: v for k, v in batch.items() if k != "label/parity"}
    with pytest.raises(KeyError, match="batch has no 'label/parity'"):
        multitask_loss({"parity": 1.0}, train_mode=False)(state.params, state, no_parity, None, None)


def test_training_lowers_every_task_loss_on_four_devices():
    mesh = train.make_mesh(4)
    model = _model(axis_name=train.AXIS)
    state = train.replicate(mesh, _state(model, optax.adam(0.02)))
    trainer = Trainer(
        mesh,
        multitask_loss({"digit": 1.0, "parity": 0.5}),
        multitask_eval(["digit", "parity"]),
        config=LoopConfig(steps=30, log_every=10, progress=False),
    )
    test = EvalSource(_data(30, seed=2), batch_size=8)
    before = trainer.evaluate(state, test)
    state, rows = trainer.fit(state, ArraySource(_data(64, seed=1), batch_size=16, seed=0), test)
    after = rows[-1]
    assert before["eval/count"] == 30
    for t in ("digit", "parity"):
        assert after[f"eval/loss/{t}"] < 0.8 * before[f"eval/loss/{t}"], t
        assert f"train/accuracy/{t}" in rows[0]


def test_backbone_from_torchvision_weights():
    sd = torchvision.models.resnet18(num_classes=7).state_dict()
    tasks = (("a", 4), ("b", 2))
    v = multitask_variables("resnet18", sd, tasks, rng=jax.random.key(1), head_init="zero", image_size=32)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    model = MultiTaskModel(models.create("resnet18", num_classes=0), tasks)
    feats = model.apply(v, x, method=lambda m, x: m.backbone(x, train=False))
    from converters.torchvision import convert

    ref = convert("resnet18", sd)
    ref_feats = models.create("resnet18", num_classes=0).apply(
        {"params": {k: p for k, p in ref["params"].items() if k != "fc"}, "batch_stats": ref["batch_stats"]}, x
    )
    np.testing.assert_array_equal(np.asarray(feats), np.asarray(ref_feats))
    out = model.apply(v, x)
    assert not np.any(np.asarray(out["a"])) and out["b"].shape == (2, 2)  # zero-initialised heads


@pytest.mark.parametrize("name,size", [("googlenet", 32), ("vit_b_32", 64)])
def test_backbones_whose_weights_fix_builder_arguments(name, size):
    """googlenet's torchvision weights carry auxiliary classifiers (before: 'converted backbone does
    not match'); a ViT backbone at 64 px gets its embeddings resampled and a matching module."""
    from converters.torchvision import convert

    kw = {"aux_logits": True, "init_weights": False} if name == "googlenet" else {}
    torch.manual_seed(0)
    sd = getattr(torchvision.models, name)(num_classes=7, **kw).state_dict()
    tasks = (("a", 4), ("b", 2))
    v = multitask_variables(name, sd, tasks, rng=jax.random.key(1), image_size=size)
    model = multitask_model(name, tasks, v)
    x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    out, _ = jax.eval_shape(  # shapes only: the values are checked in inference mode below
        lambda v: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}), v
    )
    assert out["a"].shape == (2, 4) and out["b"].shape == (2, 2)
    ref = models.at_size(name, convert(name, sd), size)
    ref_module = models.create(name, num_classes=0, **({"image_size": size} if name == "vit_b_32" else {}))
    ref_params = {k: p for k, p in ref["params"].items() if k not in ("fc", "heads", "aux1", "aux2")}
    want = ref_module.apply({"params": ref_params, "batch_stats": ref["batch_stats"]}, x)
    got = model.apply(v, x, method=lambda m, x: m.backbone(x, train=False))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
