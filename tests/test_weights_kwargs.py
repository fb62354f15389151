"""Models whose weights fix builder arguments: a ViT fine-tuned or distilled at another image size
(its positional embeddings resampled as torchvision's `interpolate_embeddings` does), and an MNASNet
version-1 checkpoint (`legacy_stem`). Before, fine-tuning, evaluation and distillation built these
models with default arguments: a ViT ran only at 224 px (not even a 384 px checkpoint at 384), a
version-1 MNASNet failed with a parameter shape error, and a ViT linear probe was refused."""

import warnings
from collections import OrderedDict

import jax
import numpy as np
import pytest
import torch
import torchvision
from engine_helpers import assert_bitwise_equal
from test_densenet_mnasnet_legacy import _mnasnet_v1_state_dict
from torchvision.models.vision_transformer import interpolate_embeddings as tv_interpolate

from converters import parity
from converters.torchvision import build_torch_model, implied_kwargs, model_kwargs, to_torch
from jtkd import distill, finetune, models, train
from jtkd.finetune import FinetuneConfig
from jtkd.loop import LoopConfig
from jtkd.optim import OptimConfig

SIZE = 64  # vit_b_32: a 2x2 patch grid instead of 7x7


@pytest.fixture(scope="module")
def vit_sd():
    model = parity.torch_model("vit_b_32", num_classes=5, seed=3)  # random LayerNorms and head
    return OrderedDict((k, v.clone()) for k, v in model.state_dict().items())


def _cfg(model, **kw):
    base = dict(model=model, image_size=SIZE, batch_size=4, eval_batch_size=8, head_init="seeded",
                optim=OptimConfig(lr=0.05, schedule="constant"), loop=LoopConfig(steps=2, log_every=1, progress=False))
    return FinetuneConfig(**{**base, **kw})


def _images(n, seed, size=SIZE):
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, 3, n).astype(np.int32)}


def test_vit_size_rule_is_torchvisions():
    """Any multiple of the patch size, as torchvision's VisionTransformer(image_size=...) takes."""
    for size in (32, 64, 96):
        models.check_input_size("vit_b_32", size)
        with torch.no_grad():
            build_torch_model("vit_b_32", "cpu", image_size=size, num_classes=3)(torch.zeros(1, 3, size, size))
    for size in (16, 48):
        with pytest.raises(ValueError, match=f"vit_b_32 .*image_size is {size}"):
            models.check_input_size("vit_b_32", size)
    with pytest.raises((AssertionError, RuntimeError)):
        build_torch_model("vit_b_32", "cpu", image_size=48, num_classes=3)(torch.zeros(1, 3, 48, 48))
    assert models.size_kwargs("vit_b_32", 64) == {"image_size": 64} and models.size_kwargs("resnet18", 64) == {}
    v = models.init("vit_b_32", jax.random.key(0), 96, num_classes=3)  # scratch at 96 px
    assert v["params"]["encoder"]["pos_embedding"].shape == (1, 10, 768)


def test_vit_finetuned_at_another_size_is_torchvisions_model_at_that_size(vit_sd):
    """initial_variables resamples the embeddings exactly as torchvision's interpolate_embeddings; the
    export loads into torchvision's vit_b_32(image_size=64) with strict=True and gives the Flax logits,
    before and after training (full mode), and the cached-feature probe trains the nested heads.head."""
    cfg = _cfg("vit_b_32", mode="full")
    v = finetune.initial_variables(cfg, 3, vit_sd)
    ref_pos = tv_interpolate(SIZE, 32, OrderedDict((k, t.clone()) for k, t in vit_sd.items()))["encoder.pos_embedding"]
    np.testing.assert_allclose(np.asarray(v["params"]["encoder"]["pos_embedding"]), ref_pos.numpy(), atol=1e-5, rtol=0)
    assert implied_kwargs("vit_b_32", v) == {"image_size": SIZE}

    ft = finetune.Finetuner(cfg, v, 3, train.make_mesh(1))
    out, _ = ft.fit(v, _images(8, 0), _images(8, 1))
    assert not np.array_equal(out["params"]["conv_proj"]["kernel"], v["params"]["conv_proj"]["kernel"])
    sd = to_torch("vit_b_32", out)
    assert model_kwargs("vit_b_32", sd) == {"num_classes": 3, "image_size": SIZE}
    ref = torchvision.models.vit_b_32(image_size=SIZE, num_classes=3)
    ref.load_state_dict(sd, strict=True)
    x = parity.probe_batch(2, SIZE, SIZE, seed=4)
    got = parity.flax_logits("vit_b_32", out, x, num_classes=3, image_size=SIZE)
    np.testing.assert_allclose(got, parity.torch_logits(ref.eval(), x), atol=1e-4, rtol=0)

    probe_cfg = _cfg("vit_b_32", mode="linear")
    probe = finetune.Finetuner(probe_cfg, v, 3, train.make_mesh(1))
    assert probe.probe
    lin, _ = probe.fit(v, _images(8, 0), _images(8, 1))
    assert not np.array_equal(lin["params"]["heads"]["head"]["kernel"], v["params"]["heads"]["head"]["kernel"])
    for k in ("conv_proj", "encoder", "class_token"):
        assert_bitwise_equal(lin["params"][k], v["params"][k])
    acc = finetune.evaluate_variables("vit_b_32", lin, _images(8, 1), train.make_mesh(1))
    assert acc["count"] == 8


def test_vit_with_pre_logits_is_not_a_linear_probe():
    v = models.init("vit_b_32", jax.random.key(0), 32, num_classes=3, representation_size=8)
    with pytest.raises(ValueError, match="head 'heads.head' is not a Linear layer"):
        finetune.check_linear_head("vit_b_32", v)


def test_mnasnet_version1_checkpoint_finetunes_and_exports():
    sd = _mnasnet_v1_state_dict(0.5, num_classes=7)
    cfg = _cfg("mnasnet0_5", mode="full", image_size=32)
    v = finetune.initial_variables(cfg, 3, dict(sd))
    ft = finetune.Finetuner(cfg, v, 3, train.make_mesh(1))
    assert ft.module.legacy_stem
    out, _ = ft.fit(v, _images(8, 0, 32), _images(8, 1, 32))
    ref = build_torch_model("mnasnet0_5", "cpu", num_classes=3, legacy_stem=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's "previous version" notice
        ref.load_state_dict(to_torch("mnasnet0_5", out), strict=True)


def test_distillation_teachers_and_students_take_their_weights_arguments(tmp_path, vit_sd):
    """A ViT teacher at the run's image size gives torchvision's logits at that size; a version-1
    MNASNet teacher and student are built with its stem."""
    from experiments import distill as exp

    torch.save(vit_sd, tmp_path / "vit.pth")
    module, variables = distill.load_teacher(f"vit_b_32:{tmp_path / 'vit.pth'}", 5, image_size=SIZE)
    ref = torchvision.models.vit_b_32(image_size=SIZE, num_classes=5)
    ref.load_state_dict(tv_interpolate(SIZE, 32, OrderedDict((k, t.clone()) for k, t in vit_sd.items())))
    x = parity.probe_batch(2, SIZE, SIZE, seed=5)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(module.apply(variables, x.transpose(0, 2, 3, 1), train=False))
    np.testing.assert_allclose(got, parity.torch_logits(ref.eval(), x), atol=1e-4, rtol=0)

    torch.save(_mnasnet_v1_state_dict(0.5, num_classes=7), tmp_path / "m.pth")
    spec = f"mnasnet0_5:{tmp_path / 'm.pth'}"
    teacher, t_vars = distill.load_teacher(spec, 7, image_size=32)
    assert teacher.legacy_stem
    assert teacher.apply(t_vars, np.zeros((2, 32, 32, 3), np.float32), train=False).shape == (2, 7)
    student_spec = exp.Student.load(spec, 3, 32)
    student, s_vars = student_spec.module().clone(axis_name=None), student_spec.variables(seed=0)
    assert student.legacy_stem
    out, _ = student.apply(s_vars, np.zeros((2, 32, 32, 3), np.float32), train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(0)})
    assert out.shape == (2, 3)
    vit_spec = exp.Student.load(f"vit_b_32:{tmp_path / 'vit.pth'}", 3, SIZE)
    assert vit_spec.module().image_size == SIZE
    s_vars = vit_spec.variables(seed=0)
    assert s_vars["params"]["encoder"]["pos_embedding"].shape == (1, 5, 768)


def test_command_lines_check_a_checkpoint_at_its_own_size(tmp_path, capsys):
    """`python -m converters` and `python -m converters.parity` on a ViT checkpoint whose image_size is
    not 224 (torchvision's SWAG weights are 384-518 px) probe at that size, and build a version-1
    MNASNet with its stem; before, both failed (torch's 'Wrong image height', a ScopeParamShapeError),
    and the parity command's per-layer table failed on every ViT."""
    import json

    from converters.__main__ import main as convert_main

    model = parity.torch_model("vit_b_32", num_classes=6, seed=2, image_size=SIZE)
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    assert convert_main(["vit_b_32", "--checkpoint", str(tmp_path / "vit.pth"), "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["probe_shape_nchw"] == [2, 3, SIZE, SIZE] and report["num_classes"] == 6
    assert report["max_abs_logit_diff"] <= 1e-4 and report["argmax_equal"]
    assert parity.main(["vit_b_32", "--checkpoint", str(tmp_path / "vit.pth")]) == 0
    out = capsys.readouterr().out
    assert "encoder.layers.encoder_layer_11" in out and "first diverging layer: none" in out
    torch.save(_mnasnet_v1_state_dict(0.5, num_classes=7), tmp_path / "m.pth")
    assert parity.main(["mnasnet0_5", "--checkpoint", str(tmp_path / "m.pth"), "--size", "45", "53"]) == 0
