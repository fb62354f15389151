"""Vision Transformer, as `torchvision.models.vision_transformer`.

Names follow torchvision: `conv_proj`, `class_token`, `encoder.pos_embedding`,
`encoder.layers.encoder_layer_{i}.{ln_1, self_attention, ln_2, mlp.0, mlp.3}`, `encoder.ln`,
`heads.head` (and `heads.pre_logits` + tanh with `representation_size`). `self_attention` is
`nn.MultiheadAttention`, whose fused `in_proj_weight` (3D, D) / `in_proj_bias` are kept as raw
parameters with torch's shapes and `out_proj` is a Linear. LayerNorm eps is 1e-6.

The positional embeddings are sized for `image_size` (default 224), which is therefore the only input
size the model takes, as in torchvision; `interpolate_embeddings` resizes them for another image size
(any multiple of the patch size) exactly as torchvision's function of the same name. The registry
names both (`size_kwarg`, `resize`), so `models.at_size` and fine-tuning/distillation at another
`image_size` resample a checkpoint's embeddings, and `models.init` sizes fresh ones.

Legacy checkpoints' `mlp.linear_{1,2}` keys are renamed to `mlp.{0,3}` (torchvision's MLPBlock load hook).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtkd.models import layers
from jtkd.models.registry import register

_xavier = nn.initializers.xavier_uniform()


class MultiheadAttention(nn.Module):
    """`torch.nn.MultiheadAttention(batch_first=True)` self-attention, need_weights=False."""

    num_heads: int = 12
    attention_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        h = self.num_heads
        w = self.param("in_proj_weight", _xavier, (3 * d, d), jnp.float32).astype(self.dtype)
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,), jnp.float32).astype(self.dtype)
        qkv = layers.linear(x, w, transpose_kernel=True) + bias
        out = layers.attention(qkv, h, dropout=layers.active_dropout(self, self.attention_dropout, train))
        return layers.Linear(d, dtype=self.dtype, name="out_proj")(out)


class EncoderBlock(layers.TorchModel):
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    attention_dropout: float = 0.0

    @nn.compact
    def __call__(self, inp: jax.Array, train: bool = False) -> jax.Array:
        d = inp.shape[-1]
        x = layers.LayerNorm(1e-6, self.dtype, name="ln_1")(inp)
        x = MultiheadAttention(self.num_heads, self.attention_dropout, self.dtype, name="self_attention")(x, train)
        x = layers.dropout(self, x, self.dropout, train) + inp
        y = layers.LayerNorm(1e-6, self.dtype, name="ln_2")(x)
        y = layers.gelu(self.linear(self.mlp_dim, kernel_init=_xavier, name="mlp_0")(y))
        y = layers.dropout(self, y, self.dropout, train)
        y = self.linear(d, kernel_init=_xavier, name="mlp_3")(y)
        return x + layers.dropout(self, y, self.dropout, train)


class EncoderLayers(layers.TorchModel):
    """torch's `encoder.layers` (an nn.Sequential of named `encoder_layer_{i}`)."""

    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    attention_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.num_layers):
            x = EncoderBlock(
                num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                attention_dropout=self.attention_dropout, dtype=self.dtype, name=f"encoder_layer_{i}",
            )(x, train)
            self.feature(f"encoder.layers.encoder_layer_{i}", x)  # the token sequence after each block
        return x


class Encoder(layers.TorchModel):
    seq_length: int = 197
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    attention_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, self.seq_length, x.shape[-1]), jnp.float32)
        x = layers.dropout(self, x + pos.astype(self.dtype), self.dropout, train)
        x = EncoderLayers(
            num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
            attention_dropout=self.attention_dropout, dtype=self.dtype, name="layers",
        )(x, train)
        return layers.LayerNorm(1e-6, self.dtype, name="ln")(x)


class Heads(layers.TorchModel):
    """torch's `heads`: [pre_logits Linear, tanh,] head Linear. Returns (input of `head`, logits or None)."""

    representation_size: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        if self.representation_size is not None:
            init = nn.initializers.truncated_normal(math.sqrt(1.0 / x.shape[-1]))
            x = jnp.tanh(self.linear(self.representation_size, kernel_init=init, name="pre_logits")(x))
        if not self.num_classes:
            return x, None
        zeros = nn.initializers.zeros  # torchvision zero-initialises the head
        return x, self.linear(self.num_classes, kernel_init=zeros, name="head")(x)


class VisionTransformer(layers.TorchModel):
    image_size: int = 224
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072
    dropout: float = 0.0
    attention_dropout: float = 0.0
    representation_size: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if x.shape[1:3] != (self.image_size, self.image_size):
            if not self.is_initializing():
                raise ValueError(
                    f"input is {x.shape[1]}x{x.shape[2]}, this ViT takes {self.image_size}x{self.image_size} "
                    "(image_size); resize the positional embeddings with interpolate_embeddings for another size"
                )
            # parameter shapes depend on image_size only: init at any size (e.g. a registry default of 224)
            x = jnp.zeros((x.shape[0], self.image_size, self.image_size, x.shape[3]), x.dtype)
        x = x.astype(self.dtype)
        n, p = x.shape[0], self.patch_size
        fan_in = 3 * p * p
        x = self.conv(
            self.hidden_dim, p, p, 0, kernel_init=nn.initializers.truncated_normal(math.sqrt(1.0 / fan_in)),
            name="conv_proj",
        )(x)
        x = self.feature("conv_proj", x)
        x = x.reshape(n, -1, self.hidden_dim)  # row-major (h, w) tokens, as torch's reshape of NCHW
        cls = self.param("class_token", nn.initializers.zeros, (1, 1, self.hidden_dim), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, self.hidden_dim)), x], axis=1)
        x = Encoder(
            seq_length=(self.image_size // p) ** 2 + 1, num_layers=self.num_layers, num_heads=self.num_heads,
            mlp_dim=self.mlp_dim, dropout=self.dropout, attention_dropout=self.attention_dropout, dtype=self.dtype,
            name="encoder",
        )(x, train)
        x = self.feature("encoder", x)[:, 0]
        if not self.num_classes and self.representation_size is None:
            return self.logits(self.feature("pooled", x))
        pooled, out = Heads(
            num_classes=self.num_classes, representation_size=self.representation_size, dtype=self.dtype,
            name="heads",
        )(x)
        self.feature("pooled", pooled)
        return self.logits(pooled if out is None else out)


# ----------------------------------------------------------------------------- resizing embeddings
def _taps(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, (n_out, taps), of torch's CPU `interpolate(..., align_corners=True)`
    along one axis, computed in float32 with torch's formulas so the result matches to rounding."""
    f = np.float32
    scale = f(n_in - 1) / f(n_out - 1) if n_out > 1 else f(0.0)
    src = (scale * np.arange(n_out, dtype=f)).astype(f)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    t = np.clip(src - i0.astype(f), f(0), f(1)).astype(f)
    if mode == "bilinear":
        return np.stack([i0, np.minimum(i0 + 1, n_in - 1)], -1), np.stack([f(1) - t, t], -1)
    if mode != "bicubic":
        raise ValueError(f"interpolation_mode must be 'bicubic' or 'bilinear' (align_corners=True), got {mode!r}")
    a = f(-0.75)  # torch's get_cubic_upsample_coefficients

    def c1(v: np.ndarray) -> np.ndarray:  # |v| <= 1
        return ((a + f(2)) * v - (a + f(3))) * v * v + f(1)

    def c2(v: np.ndarray) -> np.ndarray:  # 1 < |v| < 2
        return ((a * v - f(5) * a) * v + f(8) * a) * v - f(4) * a

    w = np.stack([c2(t + f(1)), c1(t), c1(f(1) - t), c2((f(1) - t) + f(1))], -1).astype(f)
    idx = np.clip(i0[:, None] + np.arange(-1, 3), 0, n_in - 1)  # border taps clamp to the edge
    return idx, w


def _resize_pos_embedding(pos: Any, image_size: int, patch_size: int, mode: str) -> Any:
    n, seq_length, hidden_dim = pos.shape
    if n != 1:
        raise ValueError(f"Unexpected position embedding shape: {pos.shape}")
    new_seq_length = (image_size // patch_size) ** 2 + 1
    if new_seq_length == seq_length:
        return pos
    side = math.isqrt(seq_length - 1)
    if side * side != seq_length - 1:
        raise ValueError(f"seq_length - 1 = {seq_length - 1} is not a perfect square")
    new_side = image_size // patch_size
    grid = np.asarray(pos, np.float32)[0, 1:].reshape(side, side, hidden_dim)
    idx, w = _taps(side, new_side, mode)
    # torch sums the taps in order, the W axis inside the H axis: out = sum_i w_i * (sum_j w_j * x[i, j])
    rows = sum(w[None, :, j, None] * grid[:, idx[:, j]] for j in range(idx.shape[1]))  # (side, new, D)
    out = sum(w[:, i, None, None] * rows[idx[:, i]] for i in range(idx.shape[1]))  # (new, new, D)
    new = np.concatenate([np.asarray(pos, np.float32)[:, :1], out.reshape(1, new_side * new_side, hidden_dim)], 1)
    return jnp.asarray(new, dtype=pos.dtype)


def interpolate_embeddings(
    image_size: int, patch_size: int, variables_or_pos_embedding: Any, interpolation_mode: str = "bicubic"
) -> Any:
    """Resize ViT positional embeddings for a new `image_size`, as torchvision's `interpolate_embeddings`.

    The class-token embedding is kept and the (side x side) grid of patch embeddings is resampled
    with `interpolate(size=image_size // patch_size, mode=interpolation_mode, align_corners=True)`.
    Accepts the (1, seq, D) array itself, a params tree or a variables tree ({'params': ...}); returns
    the same kind with the embedding replaced (inputs are not modified). Use the result with
    `create(name, image_size=image_size)`.
    """
    if isinstance(variables_or_pos_embedding, Mapping):
        tree = variables_or_pos_embedding
        if "params" in tree:
            params = interpolate_embeddings(image_size, patch_size, tree["params"], interpolation_mode)
            return {**tree, "params": params}
        enc = tree["encoder"]
        pos = _resize_pos_embedding(enc["pos_embedding"], image_size, patch_size, interpolation_mode)
        return {**tree, "encoder": {**enc, "pos_embedding": pos}}
    return _resize_pos_embedding(variables_or_pos_embedding, image_size, patch_size, interpolation_mode)


# ----------------------------------------------------------------------------------------- registry
def _infer_vit_kwargs(state_dict: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """image_size from the positional embeddings (torchvision requires it to be a multiple of the patch
    size, so it is unique) and representation_size from `heads.pre_logits`."""
    kw: dict[str, Any] = {}
    pos, proj = state_dict.get("encoder.pos_embedding"), state_dict.get("conv_proj.weight")
    if pos is not None and proj is not None:
        kw["image_size"] = math.isqrt(pos[1] - 1) * proj[-1]
    if "heads.pre_logits.weight" in state_dict:
        kw["representation_size"] = state_dict["heads.pre_logits.weight"][0]
    return kw


_CONFIGS = {  # patch_size, num_layers, num_heads, hidden_dim, mlp_dim
    "vit_b_16": (16, 12, 12, 768, 3072),
    "vit_b_32": (32, 12, 12, 768, 3072),
    "vit_l_16": (16, 24, 16, 1024, 4096),
    "vit_l_32": (32, 24, 16, 1024, 4096),
    "vit_h_14": (14, 32, 16, 1280, 5120),
}
_SLOW = {"vit_l_16", "vit_l_32", "vit_h_14"}  # > 300M parameters


def _resize(variables: Mapping[str, Any], size: int, patch_size: int) -> Any:
    return interpolate_embeddings(size, patch_size, variables)

for _name, (_p, _l, _h, _d, _m) in _CONFIGS.items():
    register(
        _name,
        VisionTransformer,
        head="heads.head",
        kwargs=dict(patch_size=_p, num_layers=_l, num_heads=_h, hidden_dim=_d, mlp_dim=_m),
        key_fixups=((r"(\.mlp\.)linear_1\.", r"\g<1>0."), (r"(\.mlp\.)linear_2\.", r"\g<1>3.")),
        infer_kwargs=_infer_vit_kwargs,
        # the positional embeddings fix the input size to image_size (224 by default): any multiple of the
        # patch size, with the embeddings resized (models.at_size) for another one
        min_size=_p,
        size_multiple=_p,
        size_kwarg="image_size",
        resize=functools.partial(_resize, patch_size=_p),
        test_size=(224, 224),
        slow=_name in _SLOW,
    )
