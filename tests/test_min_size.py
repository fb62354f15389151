"""Each family's `min_size` is torchvision's real limit (train and eval mode), jtkd runs there, and
the fine-tuning config refuses smaller images with an error naming the model and the size."""

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import pytest
import torch

from converters.torchvision import build_torch_model
from jtkd import models
from jtkd.finetune import FinetuneConfig

# one model per family; vit_* take multiples of their patch size at a matching image_size, not a range
# (tests/test_weights_kwargs.py)
FAMILIES = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3",
    "maxvit_t", "mnasnet0_5", "mobilenet_v3_small", "regnet_x_400mf", "resnet18", "shufflenet_v2_x0_5",
    "squeezenet1_0", "squeezenet1_1", "swin_t", "swin_v2_t", "vgg11",
]


def _apply(module, variables, x, train):
    return module.apply(variables, x, train=train, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})


def _torch_runs(model, size):
    try:
        with torch.no_grad():
            model.train()
            model(torch.zeros(2, 3, size, size))
            model.eval()
            model(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError, AssertionError):
        return False
    return True


@pytest.mark.parametrize("name", FAMILIES)
def test_min_size_is_torchvisions_limit_and_jtkd_runs_there(name):
    low = models.get_spec(name).min_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception's init-weights notice
        ref = build_torch_model(name, "cpu", num_classes=3, **({"aux_logits": False} if name == "inception_v3" else {}))
    assert _torch_runs(ref, low)
    if low > 1:
        assert not _torch_runs(ref, low - 1)
    kw = {"aux_logits": False} if name == "inception_v3" else {}  # its aux head needs 299 px (test below)
    module = models.create(name, num_classes=3, **kw)
    variables = models.shapes(module, max(low, 32) if name != "maxvit_t" else 224)
    for train in (False, True):
        out = jax.eval_shape(partial(_apply, module, train=train), variables, jnp.zeros((2, low, low, 3)))
        logits = out[0][0] if isinstance(out[0], tuple) else out[0]  # googlenet's train mode adds aux logits
        assert logits.shape == (2, 3)


def test_too_small_images_are_a_clear_error():
    with pytest.raises(ValueError, match=r"alexnet needs inputs of at least 63 px .*image_size is 62"):
        FinetuneConfig(model="alexnet", image_size=62).validate()
    FinetuneConfig(model="resnet18", image_size=8).validate()  # torchvision's resnets run at any size


def test_inception_aux_head_below_299_px_is_named_and_finetuning_trains_without_it():
    module = models.create("inception_v3", num_classes=3)
    variables = models.shapes(module, 299)
    with pytest.raises(ValueError, match="auxiliary classifier needs inputs of at least 299 px"):
        jax.eval_shape(partial(_apply, module, train=True), variables, jnp.zeros((2, 224, 224, 3)))
    assert models.aux_heads("inception_v3", variables["params"]) == ["AuxLogits"]
    assert sorted(models.aux_heads("googlenet", models.shapes("googlenet", 64)["params"])) == ["aux1", "aux2"]
    assert models.aux_heads("resnet18", models.shapes("resnet18", 32)["params"]) == []


def test_quick_runs_pick_a_size_every_model_takes():
    """--quick used 32 px for every model, below inception_v3's, alexnet's, maxvit_t's limits and not a
    multiple of vit_h_14's patch; it now takes the smallest accepted size from 32 up."""
    from experiments.finetune import FinetuneJob

    want = {"resnet18": 32, "inception_v3": 75, "alexnet": 63, "maxvit_t": 221, "vit_h_14": 42, "vit_b_16": 32}
    for name, size in want.items():
        job = FinetuneJob(finetune=FinetuneConfig(model=name, workdir="w"), quick=True).quick_version()
        assert job.finetune.image_size == size == models.smallest_size(name, 32), name
        job.finetune.validate()
