"""GoogLeNet / Inception v3 auxiliary heads: train-mode outputs are torchvision's tuples, and convert()
reads `aux_logits` from whether the checkpoint carries the aux heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import parity
from converters.torchvision import convert
from jtkd import models


@pytest.mark.parametrize(
    "name,size,kw",
    [("googlenet", (97, 131), {"dropout": 0.0, "dropout_aux": 0.0}), ("inception_v3", (299, 301), {"dropout": 0.0})],
)
def test_train_mode_returns_aux_tuple_like_torch(name, size, kw):
    model = parity.torch_model(name, num_classes=7, seed=3, **kw)
    variables = convert(name, model.state_dict())
    x = parity.probe_batch(2, *size, seed=4)
    model.train()
    with torch.no_grad():
        ref = [t.numpy() for t in model(torch.from_numpy(x))]
    module = models.create(name, num_classes=7, **kw)
    with jax.default_matmul_precision("highest"):
        # jit: op-by-op dispatch compiles every distinct op shape on its own, several times slower here
        apply = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))
        got, _ = apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert isinstance(got, tuple) and len(got) == len(ref) == (3 if name == "googlenet" else 2)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), r, atol=1e-4 * max(1.0, np.abs(r).max()), rtol=0)


@pytest.mark.parametrize("name,prefix", [("googlenet", "aux1."), ("inception_v3", "AuxLogits.")])
@pytest.mark.parametrize("aux", [True, False])
def test_convert_infers_aux_logits(name, prefix, aux):
    sd = parity.torch_model(name, num_classes=5, aux_logits=aux).state_dict()
    assert any(k.startswith(prefix) for k in sd) == aux
    variables = convert(name, sd)
    assert (prefix.rstrip(".") in variables["params"]) == aux
    # eval mode returns the main logits only, with or without aux heads
    module = models.create(name, num_classes=5, aux_logits=aux)
    out = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, jnp.zeros((1, 299, 299, 3)))
    assert out.shape == (1, 5)
