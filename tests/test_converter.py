"""Strict conversion: error paths, checkpoint loading, the CLI, head surgery and the way back."""

import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from converters import parity
from converters.__main__ import main as cli_main
from converters.torchvision import (
    ConversionError,
    UnsafeCheckpointError,
    convert,
    flax_path,
    load_checkpoint,
    to_torch,
)
from jtkd import checkpoint, models


@pytest.fixture(scope="module")
def r18():
    return parity.torch_model("resnet18", num_classes=10, seed=5)


def test_flax_path_is_mechanical():
    assert flax_path("layer1.0.downsample.1.weight") == ("layer1_0", "downsample_1", "weight")
    assert flax_path("features.1.0.block.0.0.weight") == ("features_1_0", "block_0_0", "weight")
    assert flax_path("encoder.layers.encoder_layer_0.ln_1.bias") == ("encoder", "layers", "encoder_layer_0", "ln_1", "bias")


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large", "regnet_x_400mf", "vit_b_16"])
def test_shape_template_is_the_routed_models_variables(name):
    """The converter's template is traced on XLA's operations: the CPU routing (oneDNN calls,
    grouped/depthwise/patch formulations) must not change any variable's shape or dtype."""
    module = models.create(name, num_classes=13)
    routed = jax.eval_shape(lambda: models.init(module, jax.random.key(0), 64))
    template = models.shapes(module, 64)
    assert jax.tree.structure(template) == jax.tree.structure(routed)
    for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(routed)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_prefixes_numpy_values_and_no_aliasing(r18):
    sd = {f"module._orig_mod.{k}": v.numpy() for k, v in r18.state_dict().items()}
    v = convert("resnet18", sd)
    ref = convert("resnet18", r18.state_dict())
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)
    # converted arrays never share memory with the torch tensors (torch updates BN stats in place)
    r18.state_dict()["bn1.running_mean"].add_(1.0)
    assert not np.allclose(ref["batch_stats"]["bn1"]["mean"], r18.state_dict()["bn1.running_mean"].numpy())
    r18.state_dict()["bn1.running_mean"].sub_(1.0)


@pytest.mark.parametrize("shape", [(6, 4, 3, 2), (1, 5), (5, 1), (1, 1, 1, 1), (3, 2, 4)])
def test_kernels_permuted_by_torch_equal_numpy_and_never_alias(shape):
    """Torch tensors' kernels are permuted by torch's copy; a permutation torch calls contiguous
    (a (1, n) weight) must still be copied, or torch's in-place updates would reach the Flax array."""
    from converters.torchvision import _torch_to_flax_array

    t = torch.arange(float(np.prod(shape))).reshape(shape)
    got = _torch_to_flax_array(t, "kernel")
    np.testing.assert_array_equal(got, _torch_to_flax_array(t.numpy().copy(), "kernel"))
    before = got.copy()
    t.add_(1.0)
    np.testing.assert_array_equal(got, before)


def test_a_training_wrappers_prefix_is_stripped_and_nothing_else(r18, tmp_path):
    """A LightningModule saves `model.conv1.weight` for its `self.model`: stripped (the strict check still
    runs). A prefix that does not sit ahead of the classifier's weight is not guessed at, and checkpoint
    BatchNorm statistics the model has no place for are reported, not a KeyError."""
    ref = convert("resnet18", r18.state_dict())
    torch.save({"state_dict": {f"model.module.{k}": v for k, v in r18.state_dict().items()}, "epoch": 1},
               tmp_path / "lightning.ckpt")
    with pytest.warns(UserWarning, match="'model.module.'"):
        got = convert("resnet18", load_checkpoint(tmp_path / "lightning.ckpt"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    headless = {f"backbone.{k}": v for k, v in r18.state_dict().items() if not k.startswith("fc.")}
    with pytest.raises(ConversionError, match=r"unexpected key\(s\):\n    backbone\.conv1\.weight"):
        convert("resnet18", headless, head="reinit", num_classes=3)
    sd = dict(r18.state_dict(), **{"layer9.bn1.running_mean": torch.zeros(4), "layer9.bn1.running_var": torch.ones(4)})
    with pytest.raises(ConversionError, match=r"2 unexpected key\(s\)"):
        convert("resnet18", sd)


def test_to_torch_without_batch_stats_is_a_report_not_a_key_error(r18):
    v = convert("resnet18", r18.state_dict())
    with pytest.raises(ConversionError, match=r"missing.*\n    bn1\.running_mean"):
        to_torch("resnet18", {"params": v["params"]})


def test_head_reinit_also_replaces_auxiliary_classifiers():
    """torchvision's inception_v3 weights carry AuxLogits with 1000 outputs; a new head for 3 classes
    needs a new AuxLogits.fc too (before, its shape mismatch failed the conversion)."""
    torch.manual_seed(0)
    ref = torchvision.models.inception_v3(num_classes=5, aux_logits=True, init_weights=False)
    v = convert("inception_v3", ref.state_dict(), head="reinit", num_classes=3, rng=jax.random.key(1))
    assert v["params"]["AuxLogits"]["fc"]["kernel"].shape == (768, 3) and v["params"]["fc"]["kernel"].shape == (2048, 3)
    np.testing.assert_array_equal(v["params"]["AuxLogits"]["conv1"]["conv"]["kernel"],
                                  ref.state_dict()["AuxLogits.conv1.conv.weight"].permute(2, 3, 1, 0).numpy())


def test_all_problems_reported_together(r18):
    sd = dict(r18.state_dict())
    sd["layer1.0.conv1.wieght"] = sd.pop("layer1.0.conv1.weight")  # renamed -> missing + unexpected
    sd["layer2.0.bn1.weight"] = torch.ones(3)  # wrong shape
    sd["extra.thing"] = torch.zeros(1)
    with pytest.raises(ConversionError) as e:
        convert("resnet18", sd)
    msg = str(e.value)
    assert "1 missing" in msg and "layer1.0.conv1.weight" in msg
    assert "2 unexpected" in msg and "layer1.0.conv1.wieght" in msg and "extra.thing" in msg
    assert "1 shape mismatch" in msg and "layer2.0.bn1.weight" in msg and "(3,)" in msg


def test_other_architecture_is_named(r18):
    with pytest.raises(ConversionError) as e:
        convert("resnet50", r18.state_dict())
    msg = str(e.value)
    assert "resnet50" in msg and "missing" in msg and "shape mismatch" in msg
    assert "another architecture?" in msg  # resnet18's keys all exist in resnet50: none is unexpected


def test_unknown_model_and_bad_input():
    with pytest.raises(KeyError, match="unknown model 'resnet9'"):
        convert("resnet9", {})
    with pytest.raises(ConversionError, match="expected a state_dict"):
        convert("resnet18", [1, 2, 3])


def test_num_classes_guard_and_head_reinit(r18):
    with pytest.raises(ConversionError, match="head='reinit'"):
        convert("resnet18", r18.state_dict(), num_classes=3)
    v = convert("resnet18", r18.state_dict(), head="reinit", num_classes=3, rng=jax.random.key(1))
    assert v["params"]["fc"]["kernel"].shape == (512, 3)
    kept = convert("resnet18", r18.state_dict())
    np.testing.assert_array_equal(v["params"]["layer4_1"]["conv2"]["kernel"], kept["params"]["layer4_1"]["conv2"]["kernel"])
    # the backbone still computes the same pooled features as torch
    x = parity.probe_batch(2, 61, 67)
    _, feats = models.features(models.create("resnet18", num_classes=3), v, jnp.asarray(x.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        r18.fc, fc = torch.nn.Identity(), r18.fc
        ref = r18(torch.from_numpy(x)).numpy()
        r18.fc = fc
    np.testing.assert_allclose(np.asarray(feats["pooled"]), ref, atol=1e-4)


def test_feature_extractor_mode(r18):
    v = convert("resnet18", r18.state_dict())
    fe = models.create("resnet18", num_classes=0)
    x = jnp.ones((2, 64, 64, 3))
    pooled = fe.apply({"params": {k: p for k, p in v["params"].items() if k != "fc"}, "batch_stats": v["batch_stats"]}, x)
    assert pooled.shape == (2, 512)
    _, feats = models.features(models.create("resnet18", num_classes=10), v, x)
    assert {"layer1", "layer2", "layer3", "layer4", "pooled"} <= set(feats)
    assert feats["layer4"].shape == (2, 2, 2, 512)
    np.testing.assert_allclose(np.asarray(feats["pooled"]), np.asarray(pooled), atol=1e-5)


def test_load_checkpoint_formats(tmp_path, r18):
    sd = r18.state_dict()
    torch.save(sd, tmp_path / "a.pth")
    torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"lr": 0.1}}, tmp_path / "b.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "c.safetensors"))
    for name in ("a.pth", "b.pt", "c.safetensors"):
        got = load_checkpoint(tmp_path / name)
        assert set(got) == set(sd)
        torch.testing.assert_close(got["fc.weight"], sd["fc.weight"])


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('JTKD_EVIL_MARKER', '/tmp/jtkd_pwned')}",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("JTKD_EVIL_MARKER", str(marker))
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": _Evil()}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    # a raw (non-zip) pickle with a code-running reduce is refused as well
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises((UnsafeCheckpointError, ValueError)):
        load_checkpoint(raw)
    assert not marker.exists()


def test_truncated_and_missing_checkpoints(tmp_path, r18):
    path = tmp_path / "full.pth"
    torch.save(r18.state_dict(), path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(cut)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pth")


def test_cli_converts_a_resnet50_checkpoint(tmp_path):
    model = torchvision.models.resnet50(num_classes=10)
    parity.randomize_(model, seed=7)
    torch.save(model.state_dict(), tmp_path / "x.pth")
    out = tmp_path / "d"
    assert cli_main(["resnet50", "--checkpoint", str(tmp_path / "x.pth"), "--out", str(out), "--probe-size", "97", "131"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_classes"] == 10 and report["argmax_equal"]
    assert report["max_abs_logit_diff"] <= 1e-4 and report["max_abs_logit"] > 1e3 * report["max_abs_logit_diff"]
    assert report["param_count"] == sum(p.numel() for p in model.parameters())
    restored = checkpoint.load_variables(out / "variables")
    ref = convert("resnet50", model.state_dict())
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_cli_errors_are_clear(tmp_path, capsys):
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), tmp_path / "r18.pth")
    assert cli_main(["resnet50", "--checkpoint", str(tmp_path / "r18.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "does not match jtkd model 'resnet50'" in capsys.readouterr().err


def test_cli_probes_with_your_images(tmp_path, capsys):
    """--images: real photos (scikit-image's samples; a folder searched recursively, non-image files left out)
    through torchvision's evaluation transform at an odd size; each image's top-5 classes, named by the
    weights' ImageNet categories, are torch's own and JAX's agree. A file that is not an image is an error."""
    from PIL import Image
    from skimage import data as samples
    from torchvision import transforms as T

    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(getattr(samples, name)()).save(photos / f"{name}.png")
    Image.fromarray(samples.camera()).save(photos / "more" / "camera.jpg")  # grayscale
    (photos / "notes.txt").write_text("not an image")
    model = parity.torch_model("resnet18", num_classes=1000, seed=3)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    h, w = 161, 171
    argv = ["resnet18", "--checkpoint", str(tmp_path / "r18.pth"), "--out", str(tmp_path / "o"), "--probe-size", str(h), str(w)]
    assert cli_main([*argv, "--images", str(photos)]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    files = [photos / "astronaut.png", photos / "chelsea.png", photos / "coffee.png", photos / "more" / "camera.jpg"]
    assert [r["file"] for r in report["images"]] == [str(f) for f in files]
    assert report["probe"] == f"images: resize {int(w / 0.875)} (bilinear), center crop {h}x{w}"
    assert report["probe_shape_nchw"] == [4, 3, h, w]
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] <= 1e-4

    categories = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    transform = T.Compose([T.Resize(int(w / 0.875)), T.CenterCrop((h, w)), T.ToTensor(), norm])
    with torch.no_grad():
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        probs = torch.softmax(model(x).double(), -1).numpy()
    for row, p in zip(report["images"], probs):
        want = [categories[c] for c in np.argsort(-p)[:5]]
        assert [c for c, _ in row["torch_top5"]] == want and [c for c, _ in row["jax_top5"]] == want
        np.testing.assert_allclose([q for _, q in row["torch_top5"]], np.sort(p)[::-1][:5], atol=2e-6)
        assert row["max_abs_prob_diff"] < 1e-5
    assert "astronaut.png: torch" in capsys.readouterr().out

    # bad images are found before anything is converted or written
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv[argv.index("--out") + 1] = str(tmp_path / "o2")
    assert cli_main([*argv, "--images", str(photos)]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert cli_main([*argv, "--images", str(tmp_path / "nowhere")]) == 2
    assert "neither a file nor a folder" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("name", ["resnet50", "swin_t", "efficientnet_b0"])
def test_cli_images_take_the_weights_own_evaluation_preset(name, tmp_path):
    """With --weights, an image is preprocessed as `weights.transforms()` does (resnet50's V2 weights resize to
    232, swin_t's bicubic, efficientnet_b0's bicubic to 256): the same array, from torchvision's metadata offline."""
    from PIL import Image
    from skimage import data as samples

    from converters.__main__ import image_transform

    Image.fromarray(samples.chelsea()).save(tmp_path / "cat.png")
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    (h, w), load, how = image_transform(name, "DEFAULT", None, 224)
    want = preset(Image.open(tmp_path / "cat.png").convert("RGB")).numpy()
    assert (h, w) == tuple(want.shape[1:]) and f"resize {preset.resize_size[0]} ({preset.interpolation.value})" in how
    np.testing.assert_allclose(load(str(tmp_path / "cat.png")), want, atol=1e-6)


def test_cli_offline_weights_message(tmp_path):
    # no internet here: torchvision's weights API fails, and the message says what to do instead
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "th"), "no_proxy": "*", "https_proxy": "http://127.0.0.1:9"}
    r = subprocess.run(
        [sys.executable, "-m", "converters", "resnet18", "--weights", "DEFAULT", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "needs internet" in r.stderr and "--checkpoint" in r.stderr


def test_to_torch_round_trip_after_finetuning_a_new_head(r18):
    v = convert("resnet18", r18.state_dict(), head="reinit", num_classes=3, rng=jax.random.key(0))
    # "fine-tune": perturb every leaf, as training would (scale-aware, running variances stay positive)
    rng = np.random.default_rng(0)
    v = jax.tree.map(lambda a: np.asarray(a) * (1 + 0.05 * rng.standard_normal(np.shape(a), dtype=np.float32)), v)
    sd = to_torch("resnet18", v)
    back = torchvision.models.resnet18(num_classes=3).eval()
    back.load_state_dict(sd, strict=True)
    x = parity.probe_batch(2, 71, 53)
    np.testing.assert_allclose(parity.torch_logits(back, x), parity.flax_logits("resnet18", v, x, num_classes=3), atol=1e-4)


def test_to_torch_reports_extra_flax_leaves(r18):
    v = convert("resnet18", r18.state_dict())
    v["params"]["surprise"] = {"kernel": np.zeros((1, 1))}
    with pytest.raises(ConversionError, match="surprise"):
        to_torch("resnet18", v)
