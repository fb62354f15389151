"""MixUp and CutMix in the train step, as torchvision's `transforms.v2.MixUp` / `CutMix`.

Each row of the *global* batch is mixed with the row before it (row 0 with the last one: torchvision's
`batch.roll(1, 0)`), with one weight lambda ~ Beta(alpha, alpha) per batch:

    MixUp   x <- lambda * x + (1 - lambda) * x_prev
    CutMix  x <- x with the box [y1:y2, x1:x2] pasted from x_prev; lambda <- 1 - box area / image area
    target  q = lambda * onehot(y) + (1 - lambda) * onehot(y_prev)   (label smoothing then applies to q)

The box is torchvision's: a centre drawn uniformly over the pixels, half-sides floor(r * W), floor(r * H)
with r = sqrt(1 - lambda) / 2, clipped to the image (computed in float32 where torchvision uses float64: a
half-side one pixel shorter in a few draws per million). The blend is equal to torchvision's up to the last
bit (XLA fuses its multiply-add). With both alphas set, each step picks one of the two with probability 1/2
(the `RandomChoice` of torchvision's reference recipe). Sharded over devices, a shard's first row gets the
previous device's last row (`ppermute`), so the pairs, lambda and the box do not depend on how many devices
the batch is split over (multi-host too, as long as the global batch's row order does not: a distillation
batch of labelled and transfer rows is ordered per host). With gradient accumulation the whole global batch
is mixed once, before it is split into micro-batches (torch mixes each loader batch, i.e. each micro-batch).

`make_batch_transform` gives the function `train.make_train_step(..., batch_transform=...)` applies to
each device's shard: the images are mixed in place and the batch gains 'label_mix' (the partner rows'
labels; 'label/<task>_mix' for each task of a multi-task batch) and 'mix_lam' (lambda per row); `targets`
turns them into q for the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

Batch = Mapping[str, jax.Array]


class Mix(NamedTuple):
    """One batch's draw: CutMix or MixUp, the Beta sample, and the CutMix box (y1, y2, x1, x2)."""

    cutmix: jax.Array
    lam: jax.Array
    box: tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def cutmix_box(lam: jax.Array, cy: jax.Array, cx: jax.Array, height: int, width: int) -> tuple[jax.Array, ...]:
    """(y1, y2, x1, x2) of torchvision's CutMix box centred at pixel (cy, cx) for the Beta sample `lam`."""
    r = 0.5 * jnp.sqrt(1.0 - lam)
    half_w = jnp.floor(r * width).astype(jnp.int32)
    half_h = jnp.floor(r * height).astype(jnp.int32)
    y1, y2 = jnp.maximum(cy - half_h, 0), jnp.minimum(cy + half_h, height)
    x1, x2 = jnp.maximum(cx - half_w, 0), jnp.minimum(cx + half_w, width)
    return y1, y2, x1, x2


def draw(key: jax.Array, mixup_alpha: float, cutmix_alpha: float, height: int, width: int) -> Mix:
    """One batch's mixing: CutMix with probability 1/2 when both alphas are set, else the one that is."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("draw() needs mixup_alpha > 0 or cutmix_alpha > 0")
    k_choice, k_lam, k_y, k_x = jax.random.split(key, 4)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(k_choice)
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(k_lam, alpha, alpha)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    return Mix(use_cutmix, lam, cutmix_box(lam, cy, cx, height, width))


def roll_rows(x: jax.Array, axis_name: str | None = None) -> jax.Array:
    """`jnp.roll(x, 1, axis=0)` of the global batch: inside `shard_map` over `axis_name`, each shard's
    first row comes from the previous shard's last one (one row crosses devices, not the batch)."""
    if axis_name is None:
        return jnp.roll(x, 1, axis=0)
    n = jax.lax.axis_size(axis_name)
    prev_last = jax.lax.ppermute(x[-1:], axis_name, [(i, (i + 1) % n) for i in range(n)])
    return jnp.concatenate([prev_last, x[:-1]], axis=0)


def mix_images(images: jax.Array, partner: jax.Array, mix: Mix) -> tuple[jax.Array, jax.Array]:
    """NHWC images mixed with their partners by `mix`, and the label weight lambda (box-adjusted for CutMix)."""
    h, w = images.shape[1], images.shape[2]
    y1, y2, x1, x2 = mix.box
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
    lam = mix.lam.astype(jnp.float32)  # in float32 for bfloat16 images too: the labels' weight is this lambda
    pasted = jnp.where(inside[None, :, :, None], partner, images)
    blended = (partner.astype(jnp.float32) * (1 - lam) + images.astype(jnp.float32) * lam).astype(images.dtype)
    area = jnp.asarray((y2 - y1) * (x2 - x1), jnp.float32) / (h * w)
    out = jnp.where(mix.cutmix, pasted, blended)
    return out, jnp.where(mix.cutmix, 1.0 - area, mix.lam.astype(jnp.float32))


def make_batch_transform(
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    *,
    image_key: str = "image",
    label_key: str = "label",
    axis_name: str | None = "data",
) -> Callable[[Batch, jax.Array], Batch] | None:
    """`(shard, key) -> shard` mixing images and adding 'label_mix' / 'mix_lam'; None when both alphas are 0.
    `key` must be the same on every device (one draw per global batch)."""
    for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if alpha < 0:
            raise ValueError(f"{name} must be >= 0, got {alpha}")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None

    def transform(batch: Batch, key: jax.Array) -> Batch:
        images = batch[image_key]
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise TypeError(f"mixing needs floating-point images, got batch[{image_key!r}] of {images.dtype}")
        mix = draw(key, mixup_alpha, cutmix_alpha, images.shape[1], images.shape[2])
        mixed, lam = mix_images(images, roll_rows(images, axis_name), mix)
        partners = {f"{k}_mix": roll_rows(v, axis_name) for k, v in batch.items() if _is_label(k, label_key)}
        return {**batch, image_key: mixed, **partners, "mix_lam": jnp.broadcast_to(lam, images.shape[:1])}

    return transform


def _is_label(key: str, label_key: str) -> bool:
    return key == label_key or key.startswith(label_key + "/")  # 'label' and a multi-task batch's 'label/<task>'


def is_mixed(batch: Mapping[str, jax.Array]) -> bool:
    return "mix_lam" in batch


def targets(batch: Batch, num_classes: int, label_key: str = "label") -> jax.Array:
    """The batch's class targets: its integer labels, or for a mixed batch the probabilities
    q = lambda * onehot(label) + (1 - lambda) * onehot(label_mix) (torchvision's label mixing; a label
    < 0, unlabelled, contributes nothing)."""
    labels = batch[label_key]
    if not is_mixed(batch):
        return labels
    lam = batch["mix_lam"][:, None]
    partner = batch[f"{label_key}_mix"]
    return jax.nn.one_hot(partner, num_classes) * (1 - lam) + jax.nn.one_hot(labels, num_classes) * lam
