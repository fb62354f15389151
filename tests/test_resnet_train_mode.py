"""Train-mode parity: batch statistics and the updated running stats follow torch's BatchNorm
(momentum 0.1 on the new value, unbiased running variance)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from converters import parity
from converters.torchvision import convert
from jtkd import models


def test_resnet18_train_mode_matches_torch():
    model = parity.torch_model("resnet18", num_classes=11, seed=3)
    variables = convert("resnet18", model.state_dict())
    x = parity.probe_batch(4, 65, 71, seed=4)
    model.train()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    ref_stats = convert("resnet18", model.state_dict())["batch_stats"]

    module = models.create("resnet18", num_classes=11)
    with jax.default_matmul_precision("highest"):
        got, new_state = module.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_stats)
    flat_got = dict(jax.tree_util.tree_leaves_with_path(new_state["batch_stats"]))
    assert len(flat_ref) == len(flat_got) == 40
    for path, want in flat_ref:
        np.testing.assert_allclose(np.asarray(flat_got[path]), want, atol=1e-5, rtol=1e-5, err_msg=str(path))
    # the running stats moved: the test would fail if train mode did not update them
    before = jax.tree.leaves(variables["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, jax.tree.leaves(ref_stats)))
