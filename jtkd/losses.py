"""Knowledge-distillation losses: pure functions of arrays, batch-mean, float32.

Logits are (B, C); image features are NHWC (B, H, W, C); embedding features are (B, D) (anything
else is flattened per example). Teacher inputs are treated as constants (`jax.lax.stop_gradient`),
so a loss never sends gradients into a teacher even if the caller forgets.

Multi-teacher: every logit loss accepts `teacher_logits` as one (B, C) array, a (K, B, C) stack or
a sequence of K (B, C) arrays, optionally with `teacher_weights` (K,); the target is the weighted
average of the teachers' softened distributions, p_t^T = sum_k w_k softmax(z_k / T), sum_k w_k = 1.

References for the formulas (and the defaults in `jtkd.distill`): Hinton et al. 2015 (KD), Zhao et
al. 2022 (DKD, mdistiller), Romero et al. 2015 (FitNets), Zagoruyko & Komodakis 2017 (AT), Park et
al. 2019 (RKD), Passalis & Tefas 2018 (PKT), Tung & Mori 2019 (SP), Sun et al. 2024 (logit
standardisation), with the
PyTorch implementations of RepDistiller / mdistiller as the numerical reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jtkd.models import layers

Array = jax.Array
TeacherLogits = Array | Sequence[Array]


# ------------------------------------------------------------------------------------------ helpers
def _f32(x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _stack_teachers(teacher_logits: TeacherLogits) -> Array:
    """(K, B, C) from one (B, C) array, a (K, B, C) stack or a sequence of (B, C) arrays."""
    if isinstance(teacher_logits, (list, tuple)):
        if not teacher_logits:
            raise ValueError("teacher_logits is an empty sequence")
        shapes = {tuple(t.shape) for t in teacher_logits}
        if len(shapes) != 1:
            raise ValueError(f"all teachers' logits must have one shape (B, C), got {sorted(shapes)}")
        t = jnp.stack([_f32(a) for a in teacher_logits])
    else:
        t = _f32(teacher_logits)
        t = t[None] if t.ndim == 2 else t
    if t.ndim != 3:
        raise ValueError(f"teacher logits must be (B, C), (K, B, C) or a list of (B, C); got shape {t.shape}")
    return jax.lax.stop_gradient(t)


def _check_logits(student_logits: Array, teachers: Array) -> None:
    if student_logits.ndim != 2:
        raise ValueError(f"student logits must be (B, C), got shape {student_logits.shape}")
    if teachers.shape[1:] != student_logits.shape:
        raise ValueError(
            f"teacher logits {teachers.shape[1:]} and student logits {student_logits.shape} differ in (B, C); "
            "distillation on logits needs the same label space"
        )


def _teacher_weights(k: int, weights: Array | Sequence[float] | None) -> Array:
    if weights is None:
        return jnp.full((k,), 1.0 / k, jnp.float32)
    w = _f32(weights)
    if w.shape != (k,):
        raise ValueError(f"teacher_weights must have one weight per teacher ({k}), got shape {w.shape}")
    return w / w.sum()


def teacher_probs(
    teacher_logits: TeacherLogits, temperature: float = 1.0, teacher_weights: Array | Sequence[float] | None = None
) -> Array:
    """p_t^T = sum_k w_k softmax(z_k / T): the (B, C) target distribution of one or several teachers."""
    t = _stack_teachers(teacher_logits)
    w = _teacher_weights(t.shape[0], teacher_weights)
    return jnp.einsum("k,kbc->bc", w, jax.nn.softmax(t / temperature, axis=-1))


def _kl_rows(p: Array, log_q: Array) -> Array:
    """sum_c p_c (log p_c - log q_c) per row, with 0 log 0 = 0 (torch's F.kl_div convention)."""
    return jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0), axis=-1)


def cross_entropy(logits: Array, labels: Array) -> Array:
    """mean_b -log softmax(z_b)_{y_b}."""
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1).mean()


# ------------------------------------------------------------------------------------- logit losses
def kd_loss(
    student_logits: Array,
    teacher_logits: TeacherLogits,
    temperature: float = 4.0,
    teacher_weights: Array | Sequence[float] | None = None,
) -> Array:
    """Soft-target term of Hinton KD: T^2 * mean_b KL(p_t^T || p_s^T).

    p^T = softmax(z / T); the T^2 factor keeps gradient magnitudes independent of T.
    """
    s = _f32(student_logits)
    t = _stack_teachers(teacher_logits)
    _check_logits(s, t)
    p_t = teacher_probs(t, temperature, teacher_weights)
    log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
    return temperature**2 * _kl_rows(p_t, log_p_s).mean()


def hinton_kd_loss(
    student_logits: Array,
    teacher_logits: TeacherLogits,
    labels: Array,
    alpha: float = 0.1,
    temperature: float = 4.0,
    teacher_weights: Array | Sequence[float] | None = None,
) -> Array:
    """alpha * CE(y, z_s) + (1 - alpha) * T^2 * mean_b KL(p_t^T || p_s^T)   (Hinton et al. 2015).

    alpha is the weight of the hard labels (0.1 is RepDistiller's CIFAR-100 setting: -r 0.1 -a 0.9).
    """
    ce = cross_entropy(student_logits, labels)
    return alpha * ce + (1.0 - alpha) * kd_loss(student_logits, teacher_logits, temperature, teacher_weights)


def standardize_logits(logits: Array, eps: float = 1e-7) -> Array:
    """z-score per example: (z - mean_c z) / (std_c z + eps), with torch's unbiased std (Sun et al. 2024)."""
    z = _f32(logits)
    mean = z.mean(-1, keepdims=True)
    std = jnp.std(z, axis=-1, keepdims=True, ddof=1)
    return (z - mean) / (std + eps)


def lskd_loss(
    student_logits: Array,
    teacher_logits: TeacherLogits,
    temperature: float = 2.0,
    teacher_weights: Array | Sequence[float] | None = None,
) -> Array:
    """Logit-standardised KD (Sun et al., CVPR 2024): T^2 * mean_b KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T)).

    Z(z) = (z - mean(z)) / (std(z) + 1e-7) per example, applied to the student and to each teacher
    before softening, so the student matches the teacher's logit *relations*, not their scale.
    Their CIFAR-100 recipe: T=2, weight 9 on this term, 0.1 on cross-entropy.
    """
    t = _stack_teachers(teacher_logits)
    return kd_loss(standardize_logits(student_logits), jax.vmap(standardize_logits)(t), temperature, teacher_weights)


def dkd_loss(
    student_logits: Array,
    teacher_logits: TeacherLogits,
    labels: Array,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    warmup: float = 1.0,
    teacher_weights: Array | Sequence[float] | None = None,
) -> Array:
    """Decoupled KD (Zhao et al., CVPR 2022): warmup * (alpha * TCKD + beta * NCKD).

    With p = softmax(z / T) and g the target class of each example:
      TCKD = T^2 * mean_b KL([p_t,g, 1 - p_t,g] || [p_s,g, 1 - p_s,g])       (binary target/other)
      NCKD = T^2 * mean_b KL(p̂_t || p̂_s),  p̂_c = p_c / (1 - p_g) over c != g  (non-target classes)
    `warmup` is mdistiller's ramp min(epoch / warmup_epochs, 1) (see `dkd_warmup`); the
    cross-entropy term (weight 1 in mdistiller) is added by the caller. For several teachers p_t is
    the averaged softened distribution and both parts are derived from it.
    """
    s = _f32(student_logits)
    t = _stack_teachers(teacher_logits)
    _check_logits(s, t)
    gt = jax.nn.one_hot(labels, s.shape[-1], dtype=bool)
    p_t = teacher_probs(t, temperature, teacher_weights)
    log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)

    # binary (target, other) distributions; log(1 - p_g) via logsumexp over the other classes (stable)
    neg = jnp.finfo(jnp.float32).min
    pt_g = jnp.sum(jnp.where(gt, p_t, 0.0), -1)
    b_t = jnp.stack([pt_g, 1.0 - pt_g], -1)
    log_ps_g = jnp.sum(jnp.where(gt, log_p_s, 0.0), -1)
    log_ps_other = jax.nn.logsumexp(jnp.where(gt, neg, log_p_s), axis=-1)
    tckd = _kl_rows(b_t, jnp.stack([log_ps_g, log_ps_other], -1)).mean()

    # non-target distributions: renormalise over c != g (the target entry has probability 0)
    other_t = jnp.where(gt, 0.0, p_t)
    p_hat_t = other_t / jnp.maximum(other_t.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    log_p_hat_s = jax.nn.log_softmax(jnp.where(gt, neg, s / temperature), axis=-1)
    nckd = _kl_rows(p_hat_t, log_p_hat_s).mean()
    return warmup * temperature**2 * (alpha * tckd + beta * nckd)


def dkd_warmup(epoch: Array | float, warmup_epochs: float) -> Array:
    """min(epoch / warmup_epochs, 1): mdistiller's ramp of the DKD term (epoch counts from 1)."""
    if warmup_epochs <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(_f32(epoch) / warmup_epochs, 1.0)


# ----------------------------------------------------------------------------------- feature losses
def match_spatial(student_feat: Array, teacher_feat: Array) -> tuple[Array, Array]:
    """Adaptive-average-pool the larger NHWC map to the smaller one's spatial size (RepDistiller's AT)."""
    (hs, ws), (ht, wt) = student_feat.shape[1:3], teacher_feat.shape[1:3]
    h, w = min(hs, ht), min(ws, wt)
    if (hs, ws) != (h, w):
        student_feat = layers.adaptive_avg_pool(student_feat, (h, w))
    if (ht, wt) != (h, w):
        teacher_feat = layers.adaptive_avg_pool(teacher_feat, (h, w))
    return student_feat, teacher_feat


def hint_loss(student_feat: Array, teacher_feat: Array) -> Array:
    """FitNets hint (Romero et al. 2015): mean over all elements of (r(f_s) - f_t)^2.

    `student_feat` is the *regressed* student feature r(f_s) (a `jtkd.distill.Connector`: 1x1 conv
    + BN to the teacher's width) and must have the teacher's channels; NHWC maps of different
    spatial size are matched by adaptive average pooling of the larger one.
    """
    s, t = _f32(student_feat), jax.lax.stop_gradient(_f32(teacher_feat))
    if s.ndim == 4 and t.ndim == 4:
        s, t = match_spatial(s, t)
    if s.shape != t.shape:
        raise ValueError(
            f"hint: student feature {s.shape} vs teacher feature {t.shape}; regress the student to the teacher's "
            "width with a connector first"
        )
    return jnp.mean(jnp.square(s - t))


def attention_map(feat: Array, p: float = 2.0, eps: float = 1e-12) -> Array:
    """Spatial attention (Zagoruyko & Komodakis 2017): Q = vec(mean_c |f_c|^p), Q / max(||Q||_2, eps).

    Mean and sum over channels differ by a constant the normalisation removes. (B, H*W).
    """
    f = _f32(feat)
    if f.ndim != 4:
        raise ValueError(f"attention transfer needs NHWC feature maps, got shape {f.shape}")
    q = jnp.mean(jnp.abs(f) ** p, axis=-1).reshape(f.shape[0], -1)
    return q / _safe_norm(q, eps)


def at_loss(student_feat: Array, teacher_feat: Array, p: float = 2.0) -> Array:
    """Attention transfer for one layer pair: mean_{b,j} (Q_s - Q_t)^2 with Q from `attention_map`.

    Channel counts may differ; spatial sizes are matched by adaptive pooling of the larger map.
    RepDistiller/Zagoruyko weight the sum over layer pairs by beta = 1000.
    """
    s, t = match_spatial(_f32(student_feat), jax.lax.stop_gradient(_f32(teacher_feat)))
    return jnp.mean(jnp.square(attention_map(s, p) - attention_map(t, p)))


def _flatten(x: Array) -> Array:
    x = _f32(x)
    return x.reshape(x.shape[0], -1)


def _safe_norm(x: Array, eps: float, axis: int = -1) -> Array:
    """max(||x||_2, eps) along `axis` (keepdims) with a finite gradient at x = 0 (torch's F.normalize)."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return jnp.sqrt(jnp.where(sq > eps * eps, sq, eps * eps))


def pairwise_distances(e: Array, eps: float = 1e-12) -> Array:
    """Euclidean distance matrix ||e_i - e_j||, computed as RepDistiller's RKD `pdist` (clamp at eps, 0 diagonal)."""
    sq = jnp.sum(jnp.square(e), axis=1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * e @ e.T, eps)
    off = ~jnp.eye(e.shape[0], dtype=bool)
    return jnp.where(off, jnp.sqrt(jnp.where(off, d2, 1.0)), 0.0)


def _smooth_l1(x: Array, y: Array) -> Array:
    """torch F.smooth_l1_loss (beta=1, mean): 0.5 d^2 if |d| < 1 else |d| - 0.5."""
    d = jnp.abs(x - y)
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def rkd_distance_loss(student_emb: Array, teacher_emb: Array) -> Array:
    """RKD-D (Park et al. 2019): smooth_l1(psi_s, psi_t), psi = ||e_i - e_j|| / mu, mu the mean off-diagonal distance."""
    s, t = _flatten(student_emb), jax.lax.stop_gradient(_flatten(teacher_emb))
    if s.shape[0] < 2:
        raise ValueError("RKD needs at least 2 examples per (per-device) batch")
    off = ~jnp.eye(s.shape[0], dtype=bool)

    def normalised(e: Array) -> Array:
        d = pairwise_distances(e)
        return d / (jnp.sum(jnp.where(off, d, 0.0)) / off.sum())

    return _smooth_l1(normalised(s), normalised(t))


def _angles(e: Array, eps: float = 1e-12) -> Array:
    """cos of the angle at j between e_i and e_k: <u_ji, u_jk>, u_ji = (e_i - e_j)/||e_i - e_j|| (B^3 entries)."""
    diff = e[None, :, :] - e[:, None, :]  # diff[j, i] = e_i - e_j, RepDistiller's unsqueeze(0) - unsqueeze(1)
    u = diff / _safe_norm(diff, eps)
    return jnp.einsum("jid,jkd->jik", u, u)


def rkd_angle_loss(student_emb: Array, teacher_emb: Array) -> Array:
    """RKD-A (Park et al. 2019): smooth_l1 between the cosines of all triplet angles of student and teacher."""
    s, t = _flatten(student_emb), jax.lax.stop_gradient(_flatten(teacher_emb))
    return _smooth_l1(_angles(s), _angles(t))


def rkd_loss(student_emb: Array, teacher_emb: Array, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Array:
    """Relational KD: distance_weight * RKD-D + angle_weight * RKD-A (Park et al.'s 25 / 50).

    Embeddings may differ in width (relations are compared, not features).
    """
    return distance_weight * rkd_distance_loss(student_emb, teacher_emb) + angle_weight * rkd_angle_loss(
        student_emb, teacher_emb
    )


def pkt_loss(student_emb: Array, teacher_emb: Array, eps: float = 1e-7) -> Array:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018), cosine kernel.

    K_ij = (cos(e_i, e_j) + 1) / 2, P_ij = K_ij / sum_j K_ij (conditional distributions), and
    loss = mean_{i,j} P^t_ij log((P^t_ij + eps) / (P^s_ij + eps)). RepDistiller weights it 30000.
    """
    def cond_probs(e: Array) -> Array:
        sq = jnp.sum(jnp.square(e), axis=1, keepdims=True)
        norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)  # finite gradient at e = 0
        e = e / (norm + eps)
        k = (e @ e.T + 1.0) / 2.0
        return k / jnp.sum(k, axis=1, keepdims=True)

    s, t = _flatten(student_emb), jax.lax.stop_gradient(_flatten(teacher_emb))
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"PKT: student batch {s.shape[0]} != teacher batch {t.shape[0]}")
    p_s, p_t = cond_probs(s), cond_probs(t)
    return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))


def sp_loss(student_feat: Array, teacher_feat: Array, eps: float = 1e-12) -> Array:
    """Similarity-preserving KD (Tung & Mori 2019).

    With F the (B, -1) flattened feature map of each network, G = F F^T row-normalised (each row
    divided by max(||row||_2, eps), torch's F.normalize), and loss = ||G_s - G_t||_F^2 / B^2. The maps
    may differ in width and size (only the B x B similarities are compared), and the Gram matrix does
    not depend on the layout the map is flattened from (NHWC here, NCHW in torch). RepDistiller weights
    it 3000.
    """
    s, t = _flatten(student_feat), jax.lax.stop_gradient(_flatten(teacher_feat))
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"SP: student batch {s.shape[0]} != teacher batch {t.shape[0]}")

    def similarities(f: Array) -> Array:
        g = f @ f.T
        return g / _safe_norm(g, eps)

    return jnp.sum(jnp.square(similarities(s) - similarities(t))) / s.shape[0] ** 2
