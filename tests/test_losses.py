"""Each loss in jtkd.losses against an independent PyTorch reference written as RepDistiller /
mdistiller / logit-standardization-KD compute it (values and, where it matters, gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jtkd import losses as _losses

RTOL, ATOL = 2e-5, 1e-6


class _Jitted:
    """jtkd.losses with every function jit-compiled: one compile per test instead of op-by-op dispatch."""

    def __getattr__(self, name):
        fn = getattr(_losses, name)
        return fn if name == "dkd_warmup" else jax.jit(fn)


losses = _Jitted()


def _rand(*shape, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)


def _close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want.detach() if hasattr(want, "detach") else want, np.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------ torch references (independent)
def ref_kd(s, t, T):  # RepDistiller DistillKL
    p_s = F.log_softmax(s / T, dim=1)
    p_t = F.softmax(t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * T**2 / s.shape[0]


def ref_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):  # mdistiller dkd_loss
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def ref_lskd(s, t, T):  # Sun et al. 2024, kd_loss(..., logit_stand=True)
    def normalize(logit):
        return (logit - logit.mean(dim=-1, keepdims=True)) / (1e-7 + logit.std(dim=-1, keepdims=True))

    log_pred_student = F.log_softmax(normalize(s) / T, dim=1)
    pred_teacher = F.softmax(normalize(t) / T, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * T**2


def ref_at(f_s, f_t, p=2):  # RepDistiller Attention.at_loss, NCHW
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    at = lambda f: F.normalize(f.pow(p).mean(1).view(f.size(0), -1))  # noqa: E731
    return (at(f_s) - at(f_t)).pow(2).mean()


def ref_rkd(f_s, f_t, w_d=25, w_a=50):  # RepDistiller RKDLoss
    def pdist(e, eps=1e-12):
        e_square = e.pow(2).sum(dim=1)
        prod = e @ e.t()
        res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    student, teacher = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(student)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = teacher.unsqueeze(0) - teacher.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = student.unsqueeze(0) - student.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return w_d * loss_d + w_a * loss_a, loss_d, loss_a


def ref_pkt(output_net, target_net, eps=0.0000001):  # RepDistiller PKT.cosine_similarity_loss
    output_net = output_net / (torch.sqrt(torch.sum(output_net**2, dim=1, keepdim=True)) + eps)
    target_net = target_net / (torch.sqrt(torch.sum(target_net**2, dim=1, keepdim=True)) + eps)
    model_similarity = (torch.mm(output_net, output_net.transpose(0, 1)) + 1.0) / 2.0
    target_similarity = (torch.mm(target_net, target_net.transpose(0, 1)) + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))


def ref_sp(g_s, g_t):  # RepDistiller Similarity.similarity_loss
    bsz = g_s.shape[0]
    g_s = torch.nn.functional.normalize(torch.mm(g_s.reshape(bsz, -1), g_s.reshape(bsz, -1).t()))
    g_t = torch.nn.functional.normalize(torch.mm(g_t.reshape(bsz, -1), g_t.reshape(bsz, -1).t()))
    g_diff = g_t - g_s
    return (g_diff * g_diff).view(-1, 1).sum(0) / (bsz * bsz)


def _nchw(x):
    return _t(np.transpose(x, (0, 3, 1, 2)))


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_matches_torch_value_and_grad(T):
    s, t = _rand(8, 10, seed=1), _rand(8, 10, seed=2)
    val, grad = jax.value_and_grad(losses.kd_loss)(jnp.asarray(s), jnp.asarray(t), T)
    ts = _t(s)
    ref = ref_kd(ts, _t(t), T)
    ref.backward()
    _close(val, ref)
    _close(grad, ts.grad, atol=1e-6)
    assert float(val) > 0.1  # distinct random logits: a zero loss would mean the KL was not computed


def test_hinton_kd_combines_ce_and_kl():
    s, t = _rand(6, 7, seed=3), _rand(6, 7, seed=4)
    y = np.array([0, 1, 2, 3, 4, 6])
    got = losses.hinton_kd_loss(s, t, y, alpha=0.3, temperature=2.0)
    ref = 0.3 * F.cross_entropy(_t(s), torch.tensor(y)) + 0.7 * ref_kd(_t(s), _t(t), 2.0)
    _close(got, ref)


def test_kd_teacher_gets_no_gradient():
    s, t = jnp.asarray(_rand(4, 5, seed=5)), jnp.asarray(_rand(4, 5, seed=6))
    g = jax.grad(lambda tt: losses.kd_loss(s, tt, 4.0))(t)
    assert np.all(np.asarray(g) == 0)


def test_multi_teacher_averages_softened_distributions():
    s = _rand(5, 6, seed=7)
    ts = [_rand(5, 6, seed=8), _rand(5, 6, seed=9), _rand(5, 6, seed=10)]
    T, w = 3.0, np.array([0.5, 0.3, 0.2])
    probs = [torch.softmax(_t(t) / T, 1) for t in ts]
    p_t = sum(wi * p for wi, p in zip(w, probs))
    ref = F.kl_div(F.log_softmax(_t(s) / T, 1), p_t, reduction="batchmean") * T**2
    _close(losses.kd_loss(s, ts, T, teacher_weights=w), ref)
    _close(losses.kd_loss(s, np.stack(ts), T, teacher_weights=w * 7), ref)  # stack form; weights renormalised
    # equal weights by default, and one teacher in a list equals the plain call
    p_eq = sum(probs) / 3
    _close(losses.kd_loss(s, ts, T), F.kl_div(F.log_softmax(_t(s) / T, 1), p_eq, reduction="batchmean") * T**2)
    _close(losses.kd_loss(s, [ts[0]], T), ref_kd(_t(s), _t(ts[0]), T))


def test_logit_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match="same label space"):
        losses.kd_loss(_rand(4, 5), _rand(4, 6), 4.0)
    with pytest.raises(ValueError, match="one shape"):
        losses.kd_loss(_rand(4, 5), [_rand(4, 5), _rand(3, 5)], 4.0)
    with pytest.raises(ValueError, match="one weight per teacher"):
        losses.kd_loss(_rand(4, 5), [_rand(4, 5), _rand(4, 5)], 4.0, teacher_weights=[1.0])


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_mdistiller(alpha, beta, T):
    s, t = _rand(8, 10, seed=11), _rand(8, 10, seed=12)
    y = np.random.default_rng(13).integers(0, 10, 8)
    val, grad = jax.value_and_grad(losses.dkd_loss)(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), alpha, beta, T)
    ts = _t(s)
    ref = ref_dkd(ts, _t(t), torch.tensor(y), alpha, beta, T)
    ref.backward()
    _close(val, ref, rtol=1e-4)
    _close(grad, ts.grad, rtol=1e-4, atol=1e-5)


def test_dkd_warmup_ramp_scales_the_loss():
    s, t, y = _rand(4, 5, seed=14), _rand(4, 5, seed=15), np.array([0, 1, 2, 3])
    full = losses.dkd_loss(s, t, y)
    assert float(losses.dkd_warmup(5, 20)) == 0.25 and float(losses.dkd_warmup(40, 20)) == 1.0
    _close(losses.dkd_loss(s, t, y, warmup=losses.dkd_warmup(5, 20)), 0.25 * np.asarray(full))


def test_dkd_is_sum_of_tckd_and_nckd():
    # alpha only scales the binary part, beta only the non-target part: the two are separable
    s, t, y = _rand(6, 8, seed=16), _rand(6, 8, seed=17), np.arange(6)
    tckd = losses.dkd_loss(s, t, y, alpha=1.0, beta=0.0)
    nckd = losses.dkd_loss(s, t, y, alpha=0.0, beta=1.0)
    assert float(tckd) > 0 and float(nckd) > 0
    _close(losses.dkd_loss(s, t, y, alpha=2.0, beta=3.0), 2 * np.asarray(tckd) + 3 * np.asarray(nckd), rtol=1e-5)


def test_lskd_matches_reference_and_is_scale_invariant():
    s, t = _rand(8, 10, seed=18), _rand(8, 10, seed=19)
    _close(losses.lskd_loss(s, t, 2.0), ref_lskd(_t(s), _t(t), 2.0), rtol=1e-4)
    # logit standardisation: an affine rescaling of either model's logits changes nothing
    _close(losses.lskd_loss(3 * s + 1, 0.5 * t - 2, 2.0), np.asarray(losses.lskd_loss(s, t, 2.0)), rtol=1e-4)
    assert not np.isclose(float(losses.kd_loss(3 * s, t, 2.0)), float(losses.kd_loss(s, t, 2.0)))


def test_hint_loss_mse_with_adaptive_pooling():
    s, t = _rand(2, 8, 8, 6, seed=20), _rand(2, 4, 4, 6, seed=21)
    ref = F.mse_loss(F.adaptive_avg_pool2d(_nchw(s), (4, 4)), _nchw(t))
    _close(losses.hint_loss(s, t), ref)
    _close(losses.hint_loss(t, s), F.mse_loss(_nchw(t), F.adaptive_avg_pool2d(_nchw(s), (4, 4))))
    with pytest.raises(ValueError, match="connector"):
        losses.hint_loss(_rand(2, 4, 4, 5), t)


@pytest.mark.parametrize("hs,ht", [(8, 8), (8, 4), (3, 7)])
def test_attention_transfer_matches_repdistiller(hs, ht):
    s, t = _rand(3, hs, hs, 5, seed=22), _rand(3, ht, ht, 9, seed=23)
    val, grad = jax.value_and_grad(losses.at_loss)(jnp.asarray(s), jnp.asarray(t))
    ts = _nchw(s)
    ref = ref_at(ts, _nchw(t))
    ref.backward()
    _close(val, ref)
    _close(np.transpose(np.asarray(grad), (0, 3, 1, 2)), ts.grad, rtol=1e-4, atol=1e-7)


def test_attention_map_is_unit_norm():
    q = losses.attention_map(_rand(2, 5, 5, 3))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(q), axis=1), 1.0, rtol=1e-6)


def test_rkd_matches_repdistiller_value_and_grad():
    s, t = _rand(7, 12, seed=24), _rand(7, 20, seed=25)
    d = losses.rkd_distance_loss(s, t)
    a = losses.rkd_angle_loss(s, t)
    val, grad = jax.value_and_grad(losses.rkd_loss)(jnp.asarray(s), jnp.asarray(t))
    ts = _t(s)
    ref, ref_d, ref_a = ref_rkd(ts, _t(t))
    ref.backward()
    _close(d, ref_d, rtol=1e-4)
    _close(a, ref_a, rtol=1e-4)
    _close(val, ref, rtol=1e-4)
    _close(grad, ts.grad, rtol=1e-3, atol=1e-5)


def test_rkd_and_pkt_gradients_finite_with_duplicates_and_zeros():
    s = _rand(5, 4, seed=26)
    s[1] = s[0]  # a zero distance between two examples
    s[2] = 0.0  # a zero embedding
    t = _rand(5, 6, seed=27)
    for fn in (losses.rkd_loss, losses.pkt_loss):
        g = jax.grad(fn)(jnp.asarray(s), jnp.asarray(t))
        assert np.all(np.isfinite(np.asarray(g))), fn.__name__


def test_pkt_matches_repdistiller():
    s, t = _rand(9, 16, seed=28), _rand(9, 32, seed=29)
    val, grad = jax.value_and_grad(losses.pkt_loss)(jnp.asarray(s), jnp.asarray(t))
    ts = _t(s)
    ref = ref_pkt(ts, _t(t))
    ref.backward()
    _close(val, ref, rtol=1e-4)
    _close(grad, ts.grad, rtol=1e-3, atol=1e-8)
    assert float(losses.pkt_loss(t, t)) == pytest.approx(0.0, abs=1e-7)  # identical relations: no loss


def test_feature_losses_flatten_maps():
    s, t = _rand(4, 2, 2, 3, seed=30), _rand(4, 2, 2, 5, seed=31)
    _close(losses.pkt_loss(s, t), ref_pkt(_t(s.reshape(4, -1)), _t(t.reshape(4, -1))), rtol=1e-4)


def test_sp_matches_repdistiller_value_and_grad():
    """NHWC maps of different widths and sizes against RepDistiller's loss on the NCHW maps it sees."""
    s, t = _rand(6, 3, 5, 8, seed=32), _rand(6, 2, 2, 16, seed=33)
    val, grad = jax.value_and_grad(losses.sp_loss)(jnp.asarray(s), jnp.asarray(t))
    ts = _nchw(s).requires_grad_()
    ref = ref_sp(ts, _nchw(t))
    ref.backward()
    _close(val, ref[0], rtol=1e-4)
    _close(grad, ts.grad.permute(0, 2, 3, 1), rtol=1e-3, atol=1e-8)
    assert float(val) > 1e-3 and float(losses.sp_loss(t, t)) == pytest.approx(0.0, abs=1e-12)
    z = s.copy()
    z[2] = 0.0  # an all-zero map: its similarity row is 0, torch's normalize keeps it finite
    assert np.all(np.isfinite(np.asarray(jax.grad(losses.sp_loss)(jnp.asarray(z), jnp.asarray(t)))))
    with pytest.raises(ValueError, match="SP: student batch 6 != teacher batch 5"):
        losses.sp_loss(s, t[:5])
