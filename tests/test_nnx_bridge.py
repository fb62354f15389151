"""jtkd.nnx_bridge: a converted model as a Flax NNX module computes what torch computes, and trains as torch
trains. Random torch weights with random BatchNorm statistics (parity.randomize_), odd sizes, 13 classes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from converters import parity
from converters.torchvision import convert, flax_module, to_torch
from jtkd.nnx_bridge import linen_variables, to_nnx

LR = 0.1


def _sgd_step(model, optimizer, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x, train=True), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_nnx_model_trains_as_torch_does():
    """Eval logits equal torch's; one train-mode SGD step in NNX (nnx.jit, nnx.Optimizer) gives torch's loss,
    parameters and BatchNorm running statistics; the way back loads into torchvision with strict=True."""
    name, size = "resnet18", (4, 37, 43)
    torch_model = parity.torch_model(name, num_classes=13, seed=2)
    x = parity.probe_batch(*size, seed=3)
    y = np.random.default_rng(4).integers(0, 13, size[0])
    variables = convert(name, torch_model.state_dict())
    model = to_nnx(name, variables)
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))

    with jax.default_matmul_precision("highest"):
        got = np.asarray(model(x_nhwc))
        np.testing.assert_array_equal(got, flax_module(name, variables).apply(variables, x_nhwc, train=False))
        np.testing.assert_allclose(got, parity.torch_logits(torch_model, x), atol=1e-4, rtol=1e-4)

        optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)
        loss = nnx.jit(_sgd_step)(model, optimizer, x_nhwc, jnp.asarray(y))

    torch_model.train()
    torch_opt = torch.optim.SGD(torch_model.parameters(), lr=LR)
    want_loss = torch.nn.functional.cross_entropy(torch_model(torch.from_numpy(x)), torch.from_numpy(y))
    want_loss.backward()
    torch_opt.step()
    np.testing.assert_allclose(float(loss), want_loss.item(), rtol=1e-5)

    before, back, want = to_torch(name, variables), to_torch(name, linen_variables(model)), torch_model.state_dict()
    assert back.keys() == want.keys()
    moved = 0
    for k, v in want.items():
        if k.endswith("num_batches_tracked"):
            continue
        # one step of lr 0.1 moves each weight by 0.1 x its gradient; the gradients agree to ~1e-6 relative
        np.testing.assert_allclose(back[k].numpy(), v.numpy(), atol=2e-5, rtol=1e-4, err_msg=k)
        moved += not torch.equal(back[k], before[k])
    assert moved > len(want) // 2  # the step and the running statistics' update changed most tensors
    fresh = parity.build_torch_model(name, num_classes=13)
    fresh.load_state_dict(back, strict=True)


def test_nnx_model_dropout_stream_and_split_merge():
    """A model without BatchNorm (squeezenet, dropout 0.5 before its classifier): eval mode is the Linen
    apply, train mode draws dropout from the module's rng stream (a new mask each call, the same masks for
    the same seed), and nnx.split / nnx.merge keep the variables."""
    name = "squeezenet1_1"
    variables = convert(name, parity.torch_model(name, num_classes=13, seed=1, calibrate=False).state_dict())
    x = jnp.asarray(parity.probe_batch(2, 45, 39, seed=5).transpose(0, 2, 3, 1))
    module = flax_module(name, variables)
    model = to_nnx(module, variables, rngs=7)
    assert not linen_variables(model)["batch_stats"]

    want = np.asarray(module.apply(variables, x, train=False))
    np.testing.assert_array_equal(np.asarray(model(x)), want)
    first, second = np.asarray(model(x, train=True)), np.asarray(model(x, train=True))
    assert not np.allclose(first, second) and not np.allclose(first, want)
    again = to_nnx(name, variables, rngs=7)
    again(x)  # every call takes the stream's next key, as flax's ToNNX does
    np.testing.assert_array_equal(np.asarray(again(x, train=True)), first)

    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, state)(x)), want)
    for a, b in zip(jax.tree.leaves(linen_variables(model)), jax.tree.leaves(variables)):
        assert a is b or np.array_equal(a, b)
