"""`jtkd.models.vit.interpolate_embeddings` against torchvision's own function, and a ViT at
image_size=160 running on resized embeddings against torchvision's model at 160."""

from collections import OrderedDict

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.vision_transformer import interpolate_embeddings as tv_interpolate

from converters import parity
from converters.torchvision import convert
from jtkd.models.vit import interpolate_embeddings


@pytest.mark.parametrize(
    "seq,image_size,patch,mode",
    [
        (197, 160, 16, "bicubic"),  # 14x14 -> 10x10
        (197, 384, 16, "bicubic"),  # 14x14 -> 24x24
        (50, 224, 16, "bicubic"),  # 7x7 -> 14x14
        (197, 160, 16, "bilinear"),
        (197, 48, 16, "bicubic"),  # 14x14 -> 3x3
        (197, 16, 16, "bicubic"),  # -> 1x1 (scale 0)
        (197, 224, 16, "bicubic"),  # same length: unchanged
    ],
)
def test_matches_torchvision(seq, image_size, patch, mode):
    pos = torch.from_numpy(np.random.default_rng(seq + image_size).standard_normal((1, seq, 24), dtype=np.float32))
    ref = tv_interpolate(image_size, patch, OrderedDict({"encoder.pos_embedding": pos.clone()}), mode)
    ref = ref["encoder.pos_embedding"].numpy()
    got = np.asarray(interpolate_embeddings(image_size, patch, jnp.asarray(pos.numpy()), mode))
    assert got.shape == ref.shape == (1, (image_size // patch) ** 2 + 1, 24)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)  # float32 rounding: a few ulp of values up to ~5
    # variables and params trees give the same array and leave their input alone
    variables = {"params": {"encoder": {"pos_embedding": jnp.asarray(pos.numpy()), "ln": {}}, "class_token": 0}}
    out = interpolate_embeddings(image_size, patch, variables, mode)
    np.testing.assert_array_equal(np.asarray(out["params"]["encoder"]["pos_embedding"]), got)
    assert out["params"]["class_token"] == 0 and "ln" in out["params"]["encoder"]
    assert variables["params"]["encoder"]["pos_embedding"].shape == (1, seq, 24)
    out = interpolate_embeddings(image_size, patch, variables["params"], mode)
    np.testing.assert_array_equal(np.asarray(out["encoder"]["pos_embedding"]), got)


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="interpolation_mode"):
        interpolate_embeddings(160, 16, jnp.zeros((1, 197, 4)), "nearest")


def test_vit_at_160_with_resized_embeddings_matches_torchvision():
    name, size = "vit_b_16", 160
    model224 = parity.torch_model(name, num_classes=13, seed=1)
    with torch.no_grad():  # torchvision zero-initialises the head: make the logits depend on the features
        model224.heads.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    sd224 = model224.state_dict()
    model160 = torchvision.models.vit_b_16(weights=None, image_size=size, num_classes=13)
    model160.load_state_dict(tv_interpolate(size, 16, OrderedDict((k, v.clone()) for k, v in sd224.items())))
    model160.eval()
    x = parity.probe_batch(2, size, size, seed=2)
    ref = parity.torch_logits(model160, x)

    variables = interpolate_embeddings(size, 16, convert(name, sd224))
    got = parity.flax_logits(name, variables, x, num_classes=13, image_size=size)
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # converting torch's resized state_dict infers image_size=160 from the embeddings
    direct = convert(name, model160.state_dict())
    np.testing.assert_allclose(
        np.asarray(direct["params"]["encoder"]["pos_embedding"]),
        np.asarray(variables["params"]["encoder"]["pos_embedding"]), atol=1e-5, rtol=0,
    )
    with pytest.raises(ValueError, match="image_size"):
        parity.flax_logits(name, variables, parity.probe_batch(1, 224, 224), num_classes=13, image_size=size)
