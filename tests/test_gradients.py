"""Gradient parity against torch, one model of every family: every parameter's gradient of an eval-mode loss,
torch's autograd in float64 against jtkd's in float32. Fine-tuning follows these gradients, and jtkd computes many of them its
own way on the CPU (oneDNN convolutions, MKL matmuls, the fused attention with Swin's masks, closed-form
norm and max-pool backwards). Random weights and BatchNorm statistics, odd sizes, 11 classes.

A ReLU network's gradient jumps where a pre-activation crosses 0, so a probe with a pre-activation
within float32 rounding of a kink has no float32 answer: either side is right. Each failure message
gives the probe's smallest distance to a kink (`_kink_margin`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from converters import parity
from converters.torchvision import convert
from jtkd import models

# model: (batch, height, width), odd sizes where the architecture allows; swin at an odd size pads its
# windows and shifts them with masks
CASES = {
    "alexnet": (2, 67, 71), "convnext_tiny": (2, 67, 61), "densenet121": (2, 37, 41), "efficientnet_b0": (2, 45, 51),
    "efficientnet_v2_s": (2, 45, 39), "googlenet": (2, 39, 45), "inception_v3": (1, 79, 83), "maxvit_t": (1, 224, 224),
    "mnasnet0_5": (2, 45, 39), "mobilenet_v2": (2, 41, 37), "mobilenet_v3_small": (2, 45, 51),
    "regnet_x_400mf": (2, 39, 45), "regnet_y_400mf": (2, 45, 39), "resnet18": (2, 39, 45), "resnext50_32x4d": (2, 37, 33),
    "shufflenet_v2_x0_5": (2, 45, 51), "squeezenet1_1": (2, 45, 39), "swin_t": (2, 75, 69), "swin_v2_t": (1, 67, 73),
    "vgg11_bn": (1, 35, 33), "vit_b_16": (1, 224, 224),
}


# The input seed per model. googlenet's is not the default: at seed 6 one ReLU input of inception4e's second
# branch is 1e-7 of its tensor's RMS from 0 in float64 (-3.5e-6 in float32 run eagerly, +5.0e-7 jit-compiled:
# the summation order decides), so that unit's gradient flows or not and the stem's gradients move by 1%.
# At seeds 7-10 googlenet matches like every other model (bench/FINDINGS.md, fifteenth session).
PROBE_SEED = {"googlenet": 8}

# The kinks of the piecewise-linear activations the models call (hardtanh: at its min_val and max_val).
_KINKS = {"relu": (0.0,), "relu_": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0), "hardsigmoid": (-3.0, 3.0)}


class _KinkMargin(TorchFunctionMode):
    """Records, for each activation call, how close its input comes to a kink, relative to the input's RMS."""

    def __init__(self):
        super().__init__()
        self.margins: list[tuple[float, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _KINKS or name == "hardtanh":
            x = args[0].detach()
            kinks = _KINKS.get(name) or (kwargs.get("min_val", args[1] if len(args) > 1 else -1.0),
                                         kwargs.get("max_val", args[2] if len(args) > 2 else 1.0))
            rms = float(x.pow(2).mean().sqrt()) or 1.0
            self.margins.append((min(float((x - k).abs().min()) for k in kinks) / rms, name))
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", list(CASES))
def test_parameter_gradients_match_torch(name):
    torch_model = parity.torch_model(name, num_classes=11, seed=5)
    x = parity.probe_batch(*CASES[name], seed=PROBE_SEED.get(name, 6))
    weights = np.random.default_rng(7).standard_normal((CASES[name][0], 11)).astype(np.float32)
    variables = convert(name, torch_model.state_dict())
    # The reference is torch in float64: torch's own float32 gradients can be the less accurate side
    # (resnext50's first BatchNorm bias: 0.7% off the float64 values, jtkd's float32 1e-6; one ReLU input,
    # 3.8e-6 in float64, is -5.9e-7 in torch's float32: the kink again, on torch's side this time).
    torch_model.double().zero_grad()
    kinks = _KinkMargin()
    with kinks:
        out = torch_model(torch.from_numpy(x).double())
    (out * torch.from_numpy(weights).double()).sum().backward()
    margin = min(kinks.margins, default=(float("inf"), "none"))
    # the gradients in the state_dict's layout (buffers as they are), converted as the weights are
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).float() for k, p in torch_model.named_parameters()}
    expected = convert(name, {k: grads.get(k, v.float()) for k, v in torch_model.state_dict().items()})["params"]

    module = models.create(name, num_classes=11)

    def loss(params, x):
        return jnp.sum(module.apply({**variables, "params": params}, x, train=False) * weights)

    with jax.default_matmul_precision("highest"):
        got = jax.jit(jax.grad(loss))(variables["params"], jnp.asarray(x.transpose(0, 2, 3, 1)))
    want_leaves = dict(jax.tree_util.tree_leaves_with_path(expected))
    got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
    assert want_leaves.keys() == got_leaves.keys()
    scale = max(float(np.abs(v).max()) for v in want_leaves.values())
    checked = 0
    for path, want in want_leaves.items():
        g, w = np.asarray(got_leaves[path]), np.asarray(want)
        assert g.shape == w.shape, path
        # relative to the largest gradient of the model: tiny gradients carry float32 noise of the big ones
        np.testing.assert_allclose(g, w, atol=2e-5 * scale, rtol=1e-3, err_msg=(
            f"{jax.tree_util.keystr(path)}; the probe's closest activation input to a kink ({margin[1]}) is "
            f"{margin[0]:.1e} of its RMS away: below ~1e-6 float32 may take the other side"))
        checked += bool(np.abs(w).max() > 1e-3 * scale)
    assert checked > len(want_leaves) // 2  # most gradients are far from zero: the comparison means something
