"""Swin Transformer v1 and v2, as `torchvision.models.swin_transformer`.

The layout is torchvision's NHWC one: `features.0` patch embedding (conv, Permute, LayerNorm), then
stages of blocks `features.{1,3,5,7}.{j}` with patch merging `features.{2,4,6}` between them, `norm`,
`head`. Windows that do not tile the map are handled as torch does: the map is zero-padded to window
multiples (the padding takes part in attention), the shift is dropped along an axis whose padded size
is no bigger than the window, and shifted windows get torch's -100 region mask. `relative_position_index`
(and v2's `relative_coords_table`) are torch buffers that are recomputed here, not loaded.

v2 differs in: cosine attention with a learned, clamped `logit_scale`; a continuous position bias
`cpb_mlp` over log-spaced coordinates (16 * sigmoid); the k part of the qkv bias forced to zero in the
forward pass; post-norm residual blocks; PatchMergingV2 normalising after the reduction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtkd.models import layers
from jtkd.models.registry import register

_trunc02 = nn.initializers.truncated_normal(0.02)  # torchvision: trunc_normal_(std=0.02) for every Linear
_xavier = nn.initializers.xavier_uniform()  # ... except the block MLPs


def relative_position_index(wh: int, ww: int) -> np.ndarray:
    """torch's `relative_position_index` buffer, flattened: (wh*ww*wh*ww,) indices into the bias table."""
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1).reshape(-1)


def relative_coords_table(wh: int, ww: int) -> np.ndarray:
    """Swin v2's `relative_coords_table` buffer (1, 2wh-1, 2ww-1, 2), in float32 as torch computes it."""
    f = np.float32
    h = np.arange(-(wh - 1), wh, dtype=f)
    w = np.arange(-(ww - 1), ww, dtype=f)
    t = np.stack(np.meshgrid(h, w, indexing="ij")).transpose(1, 2, 0)[None].copy()
    t[..., 0] /= f(wh - 1)
    t[..., 1] /= f(ww - 1)
    t *= f(8)
    return (np.sign(t) * np.log2(np.abs(t) + f(1)) / f(3)).astype(f)


def shift_mask(pad_h: int, pad_w: int, window: Sequence[int], shift: Sequence[int]) -> np.ndarray:
    """torch's attention mask of shifted windows: (num_windows, N, N), 0 within a region, -100 across."""
    wh, ww = window
    img = np.zeros((pad_h, pad_w), np.float32)
    count = 0
    for h0, h1 in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
        for w0, w1 in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
            img[h0:h1, w0:w1] = count
            count += 1
    img = img.reshape(pad_h // wh, wh, pad_w // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = img[:, None, :] - img[:, :, None]
    return np.where(diff != 0, np.float32(-100.0), np.float32(0.0))


class ShiftedWindowAttention(layers.TorchModel):
    """torchvision's ShiftedWindowAttention (v1) / ShiftedWindowAttentionV2 (`v2=True`), on (B, H, W, C)."""

    num_heads: int = 3
    window_size: Sequence[int] = (7, 7)
    shift_size: Sequence[int] = (0, 0)
    attention_dropout: float = 0.0
    dropout: float = 0.0
    v2: bool = False

    def _position_bias(self) -> jax.Array:
        wh, ww = self.window_size
        n = wh * ww
        if self.v2:
            table = jnp.asarray(relative_coords_table(wh, ww), self.dtype)
            table = nn.relu(self.linear(512, kernel_init=_trunc02, name="cpb_mlp_0")(table))
            table = self.linear(self.num_heads, bias=False, kernel_init=_trunc02, name="cpb_mlp_2")(table)
            table = table.reshape(-1, self.num_heads)
        else:
            shape = ((2 * wh - 1) * (2 * ww - 1), self.num_heads)
            table = self.param("relative_position_bias_table", _trunc02, shape, jnp.float32).astype(self.dtype)
        bias = table[relative_position_index(wh, ww)].reshape(n, n, -1).transpose(2, 0, 1)[None]
        return 16 * jax.nn.sigmoid(bias) if self.v2 else bias

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, h, w, c = x.shape
        wh, ww = self.window_size
        nh = self.num_heads
        pad_b, pad_r = (wh - h % wh) % wh, (ww - w % ww) % ww
        x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        ph, pw = h + pad_b, w + pad_r
        shift = [0 if wh >= ph else self.shift_size[0], 0 if ww >= pw else self.shift_size[1]]
        if sum(shift) > 0:
            x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
        nwin = (ph // wh) * (pw // ww)
        x = x.reshape(b, ph // wh, wh, pw // ww, ww, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * nwin, wh * ww, c)
        n = wh * ww

        qkv_layer = self.linear(3 * c, kernel_init=_trunc02, name="qkv")
        qkv = qkv_layer(x)
        scale = None
        if self.v2:
            # torch zeroes the k part of the qkv bias in every forward pass
            k_bias = qkv_layer.variables["params"]["bias"].astype(self.dtype)[c : 2 * c]
            qkv = qkv - jnp.concatenate([jnp.zeros((c,), self.dtype), k_bias, jnp.zeros((c,), self.dtype)])
            # cosine attention: unit q and k, q times its head's logit scale, then plain attention
            logit_scale = self.param(
                "logit_scale", lambda _, s: jnp.full(s, math.log(10.0), jnp.float32), (nh, 1, 1)
            )
            q, k, v = jnp.moveaxis(qkv.reshape(b * nwin, n, 3, nh, c // nh), 2, 0)
            # F.normalize: t / max(|t|, 1e-12), as sqrt(max(|t|^2, 1e-24)) so that a zero row (a padded window's
            # token) gets a zero gradient, not jnp.linalg.norm's NaN at 0
            normalize = lambda t: t / jnp.sqrt(jnp.maximum(jnp.sum(t * t, -1, keepdims=True), 1e-24))  # noqa: E731
            q = normalize(q) * jnp.exp(jnp.minimum(logit_scale, math.log(100.0))).reshape(nh, 1).astype(self.dtype)
            qkv, scale = jnp.stack([q, normalize(k), v], axis=2).reshape(b * nwin, n, 3 * c), 1.0
        bias = self._position_bias()  # (1, nH, N, N)
        if sum(shift) > 0:  # window w of every image: its mask, (nW, nH, N, N)
            bias = bias + jnp.asarray(shift_mask(ph, pw, self.window_size, shift), self.dtype)[:, None]
        x = layers.attention(qkv, nh, bias, scale, dropout=layers.active_dropout(self, self.attention_dropout, train))
        x = self.linear(c, kernel_init=_trunc02, name="proj")(x)
        x = layers.dropout(self, x, self.dropout, train)
        x = x.reshape(b, ph // wh, pw // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        if sum(shift) > 0:
            x = jnp.roll(x, (shift[0], shift[1]), axis=(1, 2))
        return x[:, :h, :w, :]


class SwinTransformerBlock(layers.TorchModel):
    """v1: x + sd(attn(norm1(x))), x + sd(mlp(norm2(x))); v2 (post-norm): x + sd(norm1(attn(x))), ..."""

    num_heads: int = 3
    window_size: Sequence[int] = (7, 7)
    shift_size: Sequence[int] = (0, 0)
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    stochastic_depth_prob: float = 0.0
    v2: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dim = x.shape[-1]
        norm1 = layers.LayerNorm(1e-5, self.dtype, name="norm1")
        attn = ShiftedWindowAttention(
            num_heads=self.num_heads, window_size=self.window_size, shift_size=self.shift_size,
            attention_dropout=self.attention_dropout, dropout=self.dropout, v2=self.v2, dtype=self.dtype,
            name="attn",
        )
        norm2 = layers.LayerNorm(1e-5, self.dtype, name="norm2")

        def mlp(y: jax.Array) -> jax.Array:
            y = layers.gelu(self.linear(int(dim * self.mlp_ratio), kernel_init=_xavier, name="mlp_0")(y))
            y = layers.dropout(self, y, self.dropout, train)
            return layers.dropout(self, self.linear(dim, kernel_init=_xavier, name="mlp_3")(y), self.dropout, train)

        sd = lambda y: layers.stochastic_depth(self, y, self.stochastic_depth_prob, train)  # noqa: E731
        if self.v2:
            x = x + sd(norm1(attn(x, train)))
            return x + sd(norm2(mlp(x)))
        x = x + sd(attn(norm1(x), train))
        return x + sd(mlp(norm2(x)))


class PatchMerging(layers.TorchModel):
    """2x2 neighbourhoods -> 4C features (odd sizes padded at the bottom/right) -> Linear to 2C.
    v1 normalises before the reduction (LayerNorm(4C)), v2 after it (LayerNorm(2C))."""

    v2: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, w, c = x.shape[-3:]
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        norm = layers.LayerNorm(1e-5, self.dtype, name="norm")
        reduction = self.linear(2 * c, bias=False, kernel_init=_trunc02, name="reduction")
        return norm(reduction(x)) if self.v2 else reduction(norm(x))


class SwinTransformer(layers.TorchModel):
    patch_size: Sequence[int] = (4, 4)
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: Sequence[int] = (7, 7)
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    stochastic_depth_prob: float = 0.1
    v2: bool = False  # torchvision's block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        p = tuple(self.patch_size)
        x = self.conv(self.embed_dim, p, p, 0, kernel_init=_trunc02, name="features_0_0")(x)
        x = self.feature("features.0", layers.LayerNorm(1e-5, self.dtype, name="features_0_2")(x))
        total, block_id = sum(self.depths), 0
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            for j in range(depth):
                x = SwinTransformerBlock(
                    num_heads=heads, window_size=tuple(self.window_size),
                    shift_size=tuple(0 if j % 2 == 0 else s // 2 for s in self.window_size),
                    mlp_ratio=self.mlp_ratio, dropout=self.dropout, attention_dropout=self.attention_dropout,
                    stochastic_depth_prob=self.stochastic_depth_prob * block_id / (total - 1), v2=self.v2,
                    dtype=self.dtype, name=f"features_{2 * i + 1}_{j}",
                )(x, train)
                block_id += 1
            x = self.feature(f"features.{2 * i + 1}", x)
            if i < len(self.depths) - 1:
                x = PatchMerging(v2=self.v2, dtype=self.dtype, name=f"features_{2 * i + 2}")(x)
        x = layers.LayerNorm(1e-5, self.dtype, name="norm")(x)
        x = self.feature("pooled", layers.adaptive_avg_pool(x, 1).reshape(x.shape[0], -1))
        if self.num_classes:
            x = self.linear(self.num_classes, kernel_init=_trunc02, name="head")(x)
        return self.logits(x)


_CONFIGS = {  # embed_dim, depths, num_heads, window, stochastic_depth_prob, v2
    "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 0.2, False),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 0.3, False),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 0.5, False),
    "swin_v2_t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 8, 0.2, True),
    "swin_v2_s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 8, 0.3, True),
    "swin_v2_b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 8, 0.5, True),
}

for _name, (_dim, _depths, _heads, _win, _sd, _v2) in _CONFIGS.items():
    register(
        _name,
        SwinTransformer,
        head="head",
        kwargs=dict(
            embed_dim=_dim, depths=_depths, num_heads=_heads, window_size=(_win, _win), stochastic_depth_prob=_sd,
            v2=_v2,
        ),
        input_size=256 if _v2 else 224,  # torchvision's evaluation crop
        min_size=4,
        derived_buffers=(r".*\.attn\.relative_position_index", r".*\.attn\.relative_coords_table"),
        # 101x135: stage maps 25x33 / 13x17 / 7x9 / 4x5, so padding to window multiples, shifted windows with
        # masks over padded maps, odd patch merging and dropped shifts are all exercised
        test_size=(101, 135),
    )
