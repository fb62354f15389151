"""Fine-tuning modes on a real torchvision ResNet-18 (at 32x32): cached-feature linear probe,
partial freezing with frozen-stage BatchNorm, bf16 compute, head initialisation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from engine_helpers import Tiny, assert_bitwise_equal, dataset, init

from jtkd import finetune, train
from jtkd.finetune import FinetuneConfig
from jtkd.loop import LoopConfig
from jtkd.optim import OptimConfig


@pytest.fixture(scope="module")
def torch_sd():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).state_dict()


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((n, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 3, n).astype(np.int32),
    }


def _cfg(**kw):
    base = dict(
        model="resnet18",
        image_size=32,
        batch_size=8,
        eval_batch_size=16,
        head_init="seeded",
        optim=OptimConfig(lr=0.1, weight_decay=1e-3, schedule="constant"),
        loop=LoopConfig(steps=3, log_every=1, progress=False),
    )
    base.update(kw)
    return FinetuneConfig(**base)


def test_cached_feature_probe_equals_frozen_backbone_probe(torch_sd):
    """Training the head on precomputed features is the same optimisation as training it through the
    frozen backbone (train=False forward), and the backbone does not change a bit."""
    mesh = train.make_mesh(1)
    data, test = _images(16, 0), _images(10, 1)
    runs = {}
    for pre in (True, False):
        cfg = _cfg(mode="linear", precompute_features=pre)
        v = finetune.initial_variables(cfg, 3, torch_sd)
        ft = finetune.Finetuner(cfg, v, 3, mesh)
        assert ft.probe is pre
        runs[pre], _ = ft.fit(v, data, test)
    np.testing.assert_allclose(
        runs[True]["params"]["fc"]["kernel"], runs[False]["params"]["fc"]["kernel"], rtol=1e-4, atol=1e-6
    )
    start = finetune.initial_variables(_cfg(mode="linear"), 3, torch_sd)
    assert not np.allclose(runs[True]["params"]["fc"]["kernel"], start["params"]["fc"]["kernel"])
    for k in start["params"]:
        if k != "fc":
            assert_bitwise_equal(runs[False]["params"][k], start["params"][k])
            assert_bitwise_equal(runs[True]["params"][k], start["params"][k])
    assert_bitwise_equal(runs[False]["batch_stats"], start["batch_stats"])
    # the merged probe is a complete model: its logits are the head applied to the cached features
    ev = finetune.Evaluator("resnet18", 3, mesh, 16)
    full = ev(runs[True], test)
    assert full["count"] == 10 and 0 <= full["accuracy"] <= 1


def test_partial_bf16_freezes_stages_and_their_batchnorm(torch_sd):
    mesh = train.make_mesh(1)
    cfg = _cfg(mode="partial", freeze_stages=2, dtype="bfloat16")
    assert cfg.bn_mode == "frozen_eval"
    v = finetune.initial_variables(cfg, 3, torch_sd)
    ft = finetune.Finetuner(cfg, v, 3, mesh)
    assert ft.frozen_modules == {"conv1", "bn1", "layer1_0", "layer1_1", "layer2_0", "layer2_1"}
    out, rows = ft.fit(v, _images(16, 0), _images(8, 1))
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(out["params"]))  # fp32 master weights
    for k in ft.frozen_modules:
        assert_bitwise_equal(out["params"][k], v["params"][k])
        if k in out["batch_stats"]:
            assert_bitwise_equal(out["batch_stats"][k], v["batch_stats"][k])
    for k in ("layer3_0", "layer4_1", "fc"):
        assert not np.array_equal(jax.tree.leaves(out["params"][k])[0], jax.tree.leaves(v["params"][k])[0]), k
    assert not np.array_equal(
        out["batch_stats"]["layer3_0"]["bn1"]["mean"], v["batch_stats"]["layer3_0"]["bn1"]["mean"]
    )


def test_initial_variables_heads_and_errors(torch_sd):
    zero = finetune.initial_variables(_cfg(mode="full", head_init="zero"), 4, torch_sd)
    assert zero["params"]["fc"]["kernel"].shape == (512, 4) and not np.any(zero["params"]["fc"]["kernel"])
    seeded = [
        finetune.initial_variables(_cfg(mode="full", seed=s), 4, torch_sd)["params"]["fc"]["kernel"] for s in (0, 0, 1)
    ]
    assert np.array_equal(seeded[0], seeded[1]) and not np.array_equal(seeded[0], seeded[2])
    np.testing.assert_array_equal(
        zero["params"]["conv1"]["kernel"], torch_sd["conv1.weight"].numpy().transpose(2, 3, 1, 0)
    )
    with pytest.raises(ValueError, match="pass a torch state_dict"):
        finetune.initial_variables(_cfg(mode="full"), 4, None)
    scratch = finetune.initial_variables(_cfg(mode="scratch"), 4, None)
    assert scratch["params"]["fc"]["kernel"].shape == (512, 4)
    finetune.check_linear_head("resnet18", zero)


def test_bn_modes_on_a_tiny_model():
    model = Tiny(3)
    v = jax.device_get(init(model))
    x = dataset(6)["image"]
    state = train.TrainState.create(model.apply, v, finetune._NO_TX)
    batch = {"image": x, "label": np.zeros(6, np.int32)}
    ref = model.apply(v, x, train=False)
    for bn, stats_change in (("eval", False), ("inference", False), ("train", True)):
        loss, (stats, _) = finetune.finetune_loss(bn=bn)(v["params"], state, batch, jax.random.key(0), None)
        changed = not np.array_equal(stats["bn1"]["mean"], v["batch_stats"]["bn1"]["mean"])
        assert changed == stats_change, bn
        if bn != "train":  # running statistics everywhere: the inference forward exactly
            np.testing.assert_allclose(loss, train.cross_entropy(ref, batch["label"]), rtol=1e-6)
    _, (stats, _) = finetune.finetune_loss(bn="frozen_eval", frozen_modules=frozenset({"bn1"}))(
        v["params"], state, batch, jax.random.key(0), None
    )
    assert np.array_equal(stats["bn1"]["mean"], v["batch_stats"]["bn1"]["mean"])
    assert not np.array_equal(stats["layer1_1"]["mean"], v["batch_stats"]["layer1_1"]["mean"])


def test_label_smoothing_matches_torch():
    logits = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    y = np.array([0, 3, 1, 1, 2])
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y), label_smoothing=0.2)
    np.testing.assert_allclose(train.cross_entropy(jnp.asarray(logits), y, 0.2), ref.item(), rtol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="freeze_stages >= 1"):
        dataclasses.replace(_cfg(), mode="partial", freeze_stages=0).validate()


def test_auxiliary_classifiers_are_carried_unchanged_and_exported():
    """googlenet fine-tunes without its aux heads (the loss is on the main logits): aux1/aux2 and their
    BatchNorm statistics come out bit-identical, everything else trains, and the export loads into
    torchvision's googlenet(aux_logits=True) with strict=True."""
    from converters.torchvision import to_torch

    torch.manual_seed(1)
    sd = torchvision.models.googlenet(num_classes=5, aux_logits=True, init_weights=True).state_dict()
    cfg = _cfg(model="googlenet", mode="full")
    v = finetune.initial_variables(cfg, 3, sd)
    ft = finetune.Finetuner(cfg, v, 3, train.make_mesh(1))
    assert ft.frozen_modules == {"aux1", "aux2"} and ft.module.aux_logits is False
    out, _ = ft.fit(v, _images(16, 0), _images(8, 1))
    for k in ("aux1", "aux2"):
        assert_bitwise_equal(out["params"][k], v["params"][k])
        assert_bitwise_equal(out["batch_stats"][k], v["batch_stats"][k])
    for k in ("conv1", "inception5b", "fc"):
        assert not np.array_equal(jax.tree.leaves(out["params"][k])[0], jax.tree.leaves(v["params"][k])[0]), k
    ref = torchvision.models.googlenet(num_classes=3, aux_logits=True, init_weights=False)
    ref.load_state_dict(to_torch("googlenet", out), strict=True)
    # a cached-feature probe: the backbone is the num_classes=0 model, which has no aux heads either
    finetune.check_linear_head("googlenet", v)
    backbone, head = finetune.split_head("googlenet", v)
    assert list(head) == ["fc"] and not any(k.startswith("aux") for k in backbone["params"])
