"""The distillation step: the objective it differentiates is the documented one, teachers stay frozen
(inference mode, no gradient, variables passed as `extra`), connectors train, 4 devices equal 1, cached
teacher logits equal live ones, multi-teacher and multi-head students work, teachers load from torch."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision

from jtkd import distill, losses, mixup, models, train
from jtkd.distill import DistillConfig
from jtkd.models import layers

pytestmark = pytest.mark.usefixtures("four_devices")
SIZE, NCLS = 8, 5


class TinyNet(layers.TorchModel):
    """Two conv stages that sow 'layer1', 'layer2', 'pooled' like the ResNets do (fast to compile)."""

    width: int = 4
    stride2: int = 2

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(self.norm(name="bn1")(self.conv(self.width, 3, 1, 1, bias=False, name="conv1")(x), train))
        self.feature("layer1", x)
        x = nn.relu(self.norm(name="bn2")(self.conv(2 * self.width, 3, self.stride2, 1, bias=False, name="conv2")(x), train))
        self.feature("layer2", x)
        x = self.feature("pooled", x.mean((1, 2)))
        if self.num_classes:
            x = self.linear(self.num_classes, name="fc")(x)
        return self.logits(x)


def _batch(seed=0, n=8):
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, SIZE, SIZE, 3)).astype(np.float32), "label": rng.integers(0, NCLS, n).astype(np.int32)}


def _teacher(seed=1, width=8, stride2=1, ncls=NCLS):
    t = TinyNet(num_classes=ncls, width=width, stride2=stride2)
    v = models.init(t, jax.random.key(seed), SIZE)
    # non-trivial running statistics: inference mode must use them, train mode would not
    v["batch_stats"] = jax.tree.map(lambda a: a + 0.3, v["batch_stats"])
    return t, v


def _setup(method, num_devices, teachers=None, lr=0.1, student=None, **cfg):
    mesh = train.make_mesh(num_devices)
    objective = distill.make_objective(DistillConfig(method=method, **cfg))
    teachers = teachers or [_teacher()]
    t_mods, t_vars = [t for t, _ in teachers], [v for _, v in teachers]
    student = student or TinyNet(num_classes=NCLS, width=4, axis_name=train.AXIS)
    s_vars = models.init(student, jax.random.key(0), SIZE)
    module = distill.build_student(student, objective, t_mods, t_vars, SIZE)
    state = distill.create_state(module, s_vars, optax.sgd(lr), SIZE, seed=0)
    step = train.make_train_step(mesh, distill.distill_loss(objective, t_mods, steps_per_epoch=1), donate=False)
    return mesh, objective, module, state, step, t_mods, t_vars


def _plain_student():
    """The test student without the mesh axis, to recompute its outputs outside shard_map."""
    return distill.DistillStudent(TinyNet(num_classes=NCLS, width=4))


def _tree_close(a, b, tol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------- objective
def test_objective_defaults_and_combinations():
    kd = distill.make_objective(DistillConfig(method="kd"))
    assert kd.ce_weight == 0.1 and [(t.name, t.weight) for t in kd.terms] == [("kd", 0.9)]
    combo = distill.make_objective(DistillConfig(method="kd+at", ce_weight=1.0, weights=(0.5, 200.0)))
    assert combo.ce_weight == 1.0 and [(t.name, t.weight) for t in combo.terms] == [("kd", 0.5), ("at", 200.0)]
    assert combo.student_features == ("layer1", "layer2", "layer3")
    assert distill.make_objective(DistillConfig(method="fitnet", hint_layer="layer3")).hints == ("layer3",)
    assert distill.make_objective(DistillConfig(method="ce")).terms == ()
    for bad, msg in [("kd+foo", "unknown"), ("kd+kd", "twice"), ("ce+kd", "cannot be combined")]:
        with pytest.raises(ValueError, match=msg):
            distill.make_objective(DistillConfig(method=bad))
    with pytest.raises(ValueError, match="one lambda per term"):
        distill.make_objective(DistillConfig(method="kd+at", weights=(1.0,)))


# -------------------------------------------------------------------------------------- the step
def _hand_objective(params, s_bs, t_mod, t_vars, student, batch, method):
    """The documented loss written out directly (one device, no shard_map)."""
    x, y = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
    t_logits, t_feats = models.features(t_mod, t_vars, x, train=False)
    (s_logits, s_state) = student.apply(
        {"params": params["student"], "batch_stats": s_bs["student"]}, x, train=True, mutable=["batch_stats", "features"]
    )
    s_feats = models.collect_features(s_state["features"])
    ce = optax.softmax_cross_entropy_with_integer_labels(s_logits, y).mean()
    if method == "kd":
        return 0.1 * ce + 0.9 * losses.kd_loss(s_logits, t_logits, 4.0)
    if method == "fitnet":
        conn = distill.Connectors(((distill.connector_name("layer2", 0), "layer2", 16),))
        proj = conn.apply({"params": params["connector"], "batch_stats": s_bs["connector"]}, {"layer2": s_feats["layer2"]},
                          train=True, mutable=["batch_stats"])[0]
        return ce + 100.0 * losses.hint_loss(proj["layer2_t0"], t_feats["layer2"])
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["kd", "fitnet"])
def test_step_differentiates_the_documented_objective(method):
    student = TinyNet(num_classes=NCLS, width=4)  # the same model without the mesh axis, for the direct version
    mesh, _, _, state, step, t_mods, t_vars = _setup(method, 1)
    batch = _batch()
    with jax.default_matmul_precision("highest"):
        grads = jax.grad(_hand_objective, argnums=0)(
            state.params, state.batch_stats, t_mods[0], t_vars[0], student, batch, method
        )
        want = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
        new, metrics = step(train.replicate(mesh, state), train.shard_batch(mesh, batch), train.replicate(mesh, t_vars))
    _tree_close(jax.device_get(new.params), want, 2e-5)
    if method == "fitnet":  # the connector is trained with the student
        moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params["connector"]), jax.tree.leaves(new.params["connector"]))]
        assert any(moved)
    assert np.isfinite(float(metrics["loss"])) and float(metrics[f"loss_{method}"]) > 0


@pytest.mark.parametrize("method", ["dkd+at", "fitnet+rkd", "lskd+pkt", "kd+sp"])
def test_four_devices_equal_one(method):
    cfg = {"at_layers": ("layer1", "layer2")} if "at" in method else {"sp_layers": ("layer2",)} if "sp" in method else {}
    batch = _batch(3)
    batch["label"][[0, 1, 2, 7]] = -1  # unlabelled rows, unevenly spread over the 4 shards
    results = []
    with jax.default_matmul_precision("highest"):
        for n in (1, 4):
            mesh, _, _, state, step, _, t_vars = _setup(method, n, **cfg)
            state = train.replicate(mesh, state)
            for _ in range(2):
                state, metrics = step(state, train.shard_batch(mesh, batch), train.replicate(mesh, t_vars))
            results.append((jax.device_get(state), jax.device_get(metrics)))
    (one, m1), (four, m4) = results
    _tree_close(one.params, four.params, 1e-4)
    _tree_close(one.batch_stats, four.batch_stats, 1e-4)
    for k in m1:  # PKT's weight 30000 multiplies a log-ratio of near-equal numbers: fp32 rounding shows at ~1e-4
        np.testing.assert_allclose(m1[k], m4[k], rtol=5e-4, atol=1e-5, err_msg=k)


def test_teacher_is_frozen_and_in_inference_mode():
    mesh, _, _, state, step, t_mods, t_vars = _setup("kd", 4)
    before = jax.tree.map(np.array, t_vars)
    batch = _batch(4)
    _, metrics = step(train.replicate(mesh, state), train.shard_batch(mesh, batch), train.replicate(mesh, t_vars))
    _tree_close(before, t_vars, 0)
    s_logits = _plain_student().apply(state.variables, batch["image"], train=True, mutable=["batch_stats"])[0]
    t_eval = t_mods[0].apply(t_vars[0], batch["image"], train=False)
    t_train = t_mods[0].apply(t_vars[0], batch["image"], train=True, mutable=["batch_stats"])[0]
    # 4 shards of 2: per-shard KD averaged = batch-mean KD; the teacher used its running statistics
    np.testing.assert_allclose(metrics["loss_kd"], losses.kd_loss(s_logits, t_eval, 4.0), rtol=1e-4)
    assert abs(float(losses.kd_loss(s_logits, t_train, 4.0)) - float(metrics["loss_kd"])) > 1e-3
    assert float(metrics["teacher_accuracy"]) == pytest.approx((np.asarray(t_eval).argmax(-1) == batch["label"]).mean())


def test_teacher_variables_are_an_argument_not_a_constant():
    mesh, _, _, state, step, _, t_vars = _setup("kd", 4)
    batch = train.shard_batch(mesh, _batch(5))
    s = train.replicate(mesh, state)
    _, m1 = step(s, batch, train.replicate(mesh, t_vars))
    other = [_teacher(seed=9)[1]]
    _, m2 = step(s, batch, train.replicate(mesh, other))  # same compiled step, different teacher
    assert step._cache_size() == 1
    assert float(m1["loss_kd"]) != float(m2["loss_kd"])


@pytest.mark.parametrize("method", ["dkd", "fitnet+at"])
def test_cached_teacher_outputs_equal_live_teacher(method):
    cfg = {"at_layers": ("layer1", "layer2")} if "at" in method else {}
    mesh, objective, _, state, step, t_mods, t_vars = _setup(method, 4, **cfg)
    batch = _batch(6)
    cached = dict(batch, **distill.teacher_outputs(t_mods, t_vars, batch["image"], objective.teacher_features, batch_size=3))
    assert set(cached) - set(batch) == {"teacher_logits"} | {f"teacher_features/0/{f}" for f in objective.teacher_features}
    s = train.replicate(mesh, state)
    live, m_live = step(s, train.shard_batch(mesh, batch), train.replicate(mesh, t_vars))
    cache, m_cache = step(s, train.shard_batch(mesh, cached), None)  # no teacher needed at all
    _tree_close(jax.device_get(live.params), jax.device_get(cache.params), 1e-5)
    for k in m_live:
        np.testing.assert_allclose(m_live[k], m_cache[k], rtol=1e-5, atol=1e-6, err_msg=k)
    with pytest.raises(ValueError, match="extra"):  # a needed output missing from the batch and no teacher
        step(s, train.shard_batch(mesh, {k: v for k, v in cached.items() if k != "teacher_logits"}), None)


def test_unlabelled_rows_get_distillation_but_no_cross_entropy():
    mesh, _, _, state, step, t_mods, t_vars = _setup("kd", 4)
    batch = _batch(11)
    labelled = np.array([1, 0, 0, 1, 1, 1, 0, 0], bool)
    batch["label"] = np.where(labelled, batch["label"], -1).astype(np.int32)
    _, m = step(train.replicate(mesh, state), train.shard_batch(mesh, batch), train.replicate(mesh, t_vars))
    s_logits = _plain_student().apply(state.variables, batch["image"], train=True, mutable=["batch_stats"])[0]
    t_logits = t_mods[0].apply(t_vars[0], batch["image"], train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(s_logits[labelled], batch["label"][labelled]).mean()
    np.testing.assert_allclose(m["ce"], ce, rtol=1e-5)  # the mean over the 4 labelled rows, not over 8
    np.testing.assert_allclose(m["loss_kd"], losses.kd_loss(s_logits, t_logits, 4.0), rtol=1e-4)  # all 8 rows
    acc = (np.asarray(s_logits).argmax(-1) == batch["label"])[labelled].mean()
    assert float(m["accuracy"]) == pytest.approx(acc)


def test_missing_feature_is_a_clear_error():
    with pytest.raises(ValueError, match="no feature"):
        _setup("fitnet", 1, hint_layer="layer7")
    with pytest.raises(ValueError, match=r"student has no feature\(s\) \['layer3'\]"):
        _setup("at", 1)  # TinyNet has two stages; checked when the student is built, not at the first step


def test_multi_teacher_kd_targets_the_averaged_distribution():
    teachers = [_teacher(1), _teacher(2, width=6)]
    mesh, _, _, state, step, t_mods, t_vars = _setup("kd", 4, teachers=teachers, teacher_weights=(3.0, 1.0))
    batch = _batch(7)
    _, metrics = step(train.replicate(mesh, state), train.shard_batch(mesh, batch), train.replicate(mesh, t_vars))
    s_logits = _plain_student().apply(state.variables, batch["image"], train=True, mutable=["batch_stats"])[0]
    t_logits = [t.apply(v, batch["image"], train=False) for t, v in zip(t_mods, t_vars)]
    # per-device KL averaged over 4 shards of 2 examples = the batch mean
    want = losses.kd_loss(s_logits, t_logits, 4.0, teacher_weights=[0.75, 0.25])
    np.testing.assert_allclose(metrics["loss_kd"], want, rtol=1e-4)
    with pytest.raises(ValueError, match="teacher weights"):
        distill.distill_loss(distill.make_objective(DistillConfig(teacher_weights=(1.0,))), t_mods)


def test_multi_head_student_learns_one_teacher_per_head():
    digit_t, parity_t = _teacher(1, ncls=NCLS), _teacher(2, ncls=2)
    backbone = TinyNet(num_classes=0, width=4, axis_name=train.AXIS)
    student = distill.MultiHeadStudent(backbone, (NCLS, 2))
    mesh = train.make_mesh(4)
    objective = distill.make_objective(DistillConfig(method="kd+rkd", ce_weight=1.0, weights=(1.0, 1.0), teacher_weights=(2.0, 1.0)))
    t_mods, t_vars = [digit_t[0], parity_t[0]], [digit_t[1], parity_t[1]]
    module = distill.build_student(student, objective, t_mods, t_vars, SIZE)
    s_vars = models.init(student, jax.random.key(0), SIZE)
    state = distill.create_state(module, s_vars, optax.adam(1e-2), SIZE)
    step = train.make_train_step(mesh, distill.distill_loss(objective, t_mods, tasks=("digit", "parity")))
    batch = _batch(8)
    batch["label/digit"] = batch.pop("label")
    batch["label/parity"] = (batch["label/digit"] % 2).astype(np.int32)
    batch["label"] = batch["label/digit"]
    state = train.replicate(mesh, state)
    first = None
    for _ in range(15):
        state, metrics = step(state, train.shard_batch(mesh, batch), train.replicate(mesh, t_vars))
        first = first or jax.device_get(metrics)
    m = jax.device_get(metrics)
    assert {"accuracy/digit", "accuracy/parity", "ce/digit", "ce/parity", "loss_kd", "loss_rkd"} <= set(m)
    assert m["loss"] < first["loss"]  # both heads and the shared backbone train
    assert set(state.params["student"]) >= {"head0", "head1", "backbone"}
    heads = module.apply(jax.device_get(state).variables, batch["image"])
    assert [h.shape for h in heads] == [(8, NCLS), (8, 2)]


# ------------------------------------------------------------------------------------------ teachers
def test_load_teacher_from_torch_checkpoint(tmp_path):
    torch.manual_seed(0)
    tmodel = torchvision.models.resnet18(num_classes=NCLS).eval()
    path = tmp_path / "teacher.pth"
    torch.save(tmodel.state_dict(), path)
    module, variables = distill.load_teacher(f"resnet18:{path}", num_classes=NCLS)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(module.apply(variables, x, train=False))
    np.testing.assert_allclose(got, ref, atol=1e-4)
    with pytest.raises(ValueError, match="predicts 5 classes but the data has 10"):
        distill.load_teacher(f"resnet18:{path}", num_classes=10)
    with pytest.raises(KeyError, match="unknown model"):
        distill.load_teacher(f"resnet9000:{path}")


def test_load_teacher_by_name_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: torchvision must download
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ConnectionError, match="internet.*checkpoint|checkpoint.*internet"):
        distill.load_teacher("resnet18")


def test_student_variables_drop_connectors():
    _, _, _, state, _, _, _ = _setup("fitnet", 1)
    sv = distill.student_variables(state)
    assert set(state.params) == {"student", "connector"}
    assert set(sv["params"]) == {"conv1", "bn1", "conv2", "bn2", "fc"}


@pytest.mark.parametrize("alphas", [(0.4, 0.0), (0.0, 1.0)], ids=["mixup", "cutmix"])
def test_mixed_batches_teacher_and_student_see_the_same_mixed_images(alphas):
    """MixUp / CutMix in the step: the teacher's logits are of the mixed images, CE is on the mixed soft
    targets of the rows whose partner is labelled too (4 devices: partners cross shard boundaries)."""
    mesh, objective, _, state, _, t_mods, t_vars = _setup("kd", 4)
    mix = mixup.make_batch_transform(*alphas, axis_name=train.AXIS)
    step = train.make_train_step(mesh, distill.distill_loss(objective, t_mods), donate=False, batch_transform=mix)
    batch = _batch(12)
    labelled = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)  # row 3's partner (row 2) is unlabelled: no CE on row 3
    batch["label"] = np.where(labelled, batch["label"], -1).astype(np.int32)
    with jax.default_matmul_precision("highest"):
        _, m = step(train.replicate(mesh, state), train.shard_batch(mesh, batch), train.replicate(mesh, t_vars))
        mixed = mixup.make_batch_transform(*alphas, axis_name=None)(batch, train.batch_rng(state))
        x = np.asarray(mixed["image"])
        assert not np.allclose(x, batch["image"])
        s_logits = _plain_student().apply(state.variables, x, train=True, mutable=["batch_stats"])[0]
        t_logits = t_mods[0].apply(t_vars[0], x, train=False)
        rows = labelled & np.roll(labelled, 1)
        q = np.asarray(mixup.targets(mixed, NCLS))[rows]
        ce = optax.softmax_cross_entropy(s_logits[rows], q).mean()
        kd_unmixed_teacher = losses.kd_loss(s_logits, t_mods[0].apply(t_vars[0], batch["image"], train=False), 4.0)
    np.testing.assert_allclose(m["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(m["loss_kd"], losses.kd_loss(s_logits, t_logits, 4.0), rtol=1e-4)
    assert abs(float(m["loss_kd"]) / float(kd_unmixed_teacher) - 1) > 1e-3  # 10x the tolerance above
    acc = (np.asarray(s_logits).argmax(-1) == batch["label"])[labelled].mean()  # of the rows' own labels
    assert float(m["accuracy"]) == pytest.approx(acc)


def test_mixing_refuses_dkd_and_cached_teacher_outputs():
    mix = mixup.make_batch_transform(0.4, axis_name=train.AXIS)
    batch = _batch(13)
    for method, cache in (("dkd", False), ("kd", True)):
        mesh, objective, _, state, _, t_mods, t_vars = _setup(method, 1)
        step = train.make_train_step(mesh, distill.distill_loss(objective, t_mods), donate=False, batch_transform=mix)
        b = dict(batch, **distill.teacher_outputs(t_mods, t_vars, batch["image"])) if cache else batch
        with pytest.raises(ValueError, match="DKD splits" if method == "dkd" else "cannot use cached teacher outputs"):
            step(train.replicate(mesh, state), train.shard_batch(mesh, b), train.replicate(mesh, t_vars))
