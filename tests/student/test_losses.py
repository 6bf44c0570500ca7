"""The losses of ``student.losses`` against values worked out from their formulas on tiny fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from student.losses import (
    LOSS_NAMES,
    LogitDiscriminator,
    TargetAwareTransformer,
    deit_hard_loss,
    deit_soft_loss,
    kd_loss,
    mealv2_losses,
    soft_cross_entropy,
    soft_targets_from_topk,
    tat_loss,
    unbiased_sampled_ce,
)

# Two samples, four classes. Student logits and class labels used throughout.
S = [[1.0, 2.0, 0.5, -1.0], [0.0, -2.0, 3.0, 1.0]]
Y = [1, 2]
# Teacher probabilities with a zero, to check that p = 0 terms vanish (no NaN).
P = [[0.5, 0.2, 0.3, 0.0], [0.1, 0.1, 0.6, 0.2]]


def log_softmax(row: list[float], T: float = 1.0) -> list[float]:
    """``log(exp(x_c / T) / sum_j exp(x_j / T))`` with plain math."""
    log_z = math.log(sum(math.exp(x / T) for x in row))
    return [x / T - log_z for x in row]


def hand_ce(logits: list[list[float]], labels: list[int]) -> float:
    return sum(-log_softmax(row)[y] for row, y in zip(logits, labels, strict=True)) / len(labels)


def hand_soft_ce(logits: list[list[float]], probs: list[list[float]], T: float = 1.0) -> float:
    return sum(-sum(p * lq for p, lq in zip(pr, log_softmax(row, T), strict=True))
               for row, pr in zip(logits, probs, strict=True)) / len(logits)


def hand_kl(logits: list[list[float]], probs: list[list[float]], T: float) -> float:
    """``mean_b sum_c p_c (log p_c - log softmax(s/T)_c)``, terms with ``p_c = 0`` left out."""
    return sum(sum(p * (math.log(p) - lq) for p, lq in zip(pr, log_softmax(row, T), strict=True) if p > 0)
               for row, pr in zip(logits, probs, strict=True)) / len(logits)


def t(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def test_loss_names():
    assert LOSS_NAMES == ("ce", "kd", "deit-soft", "deit-hard", "mealv2", "sampled", "tat")


# -- soft_targets_from_topk ----------------------------------------------------------------------------


def test_soft_targets_exact_topk_and_even_tail():
    # row 0: top-2 probabilities 0.5 and 0.2 (lse 0); 0.3 missing, 0.15 to each of classes 2 and 3
    # row 1: top-2 probabilities 0.6 and 0.3 (logits shifted by lse = 2); 0.1 missing, 0.05 to classes 0 and 2
    idx = torch.tensor([[1, 0], [3, 1]])
    logit = t([[math.log(0.5), math.log(0.2)], [math.log(0.6) + 2, math.log(0.3) + 2]])
    lse = t([0.0, 2.0])
    q = soft_targets_from_topk(idx, logit, lse, num_classes=4)
    expected = t([[0.2, 0.5, 0.15, 0.15], [0.05, 0.3, 0.05, 0.6]])
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(2))


def test_soft_targets_from_real_teacher_logits():
    logits = [2.0, 1.0, 0.0, -1.0]
    z = sum(math.exp(x) for x in logits)
    tail = (math.exp(0.0) + math.exp(-1.0)) / z / 2
    q = soft_targets_from_topk(torch.tensor([[0, 1]]), t([[2.0, 1.0]]), t([math.log(z)]), num_classes=4)
    torch.testing.assert_close(q, t([[math.exp(2.0) / z, math.exp(1.0) / z, tail, tail]]))


def test_soft_targets_clamp_missing_mass():
    # top-k mass 0.7 + 0.4 > 1 (rounding): the tail gets nothing and the row is renormalised
    q = soft_targets_from_topk(torch.tensor([[0, 1]]), t([[math.log(0.7), math.log(0.4)]]), t([0.0]), 3)
    torch.testing.assert_close(q, t([[0.7 / 1.1, 0.4 / 1.1, 0.0]]))


def test_soft_targets_tempered():
    idx, logit = torch.tensor([[1, 0]]), t([[math.log(0.5), math.log(0.2)]])
    q = soft_targets_from_topk(idx, logit, t([0.0]), 4, T=2.0)
    roots = [math.sqrt(v) for v in (0.2, 0.5, 0.15, 0.15)]  # q^(1/T), renormalised
    torch.testing.assert_close(q, t([[r / sum(roots) for r in roots]]))


def test_soft_targets_tempered_is_exact_with_all_classes():
    logits, T = [2.0, 1.0, 0.0, -1.0], 3.0
    z = sum(math.exp(x) for x in logits)
    q = soft_targets_from_topk(torch.tensor([[0, 1, 2, 3]]), t([logits]), t([math.log(z)]), 4, T=T)
    z_T = sum(math.exp(x / T) for x in logits)
    torch.testing.assert_close(q, t([[math.exp(x / T) / z_T for x in logits]]))


@pytest.mark.parametrize("kwargs, match", [
    ({"T": 0.0}, "T > 0"),
    ({"num_classes": 1}, "num_classes >= k"),
    ({"lse": t([0.0])}, "lse"),
    ({"topk_logit": t([[0.0], [0.0]])}, "topk_logit"),
    ({"topk_idx": torch.tensor([[0, 4], [1, 2]])}, "outside"),
])
def test_soft_targets_bad_inputs(kwargs, match):
    args = {"topk_idx": torch.tensor([[0, 1], [1, 2]]), "topk_logit": t([[0.0, -1.0], [0.0, -1.0]]),
            "lse": t([1.0, 1.0]), "num_classes": 4, "T": 1.0}
    with pytest.raises(ValueError, match=match):
        soft_targets_from_topk(**{**args, **kwargs})


# -- soft cross-entropy, KD, DeiT ----------------------------------------------------------------------


def test_soft_cross_entropy():
    torch.testing.assert_close(soft_cross_entropy(t(S), t(P)), torch.tensor(hand_soft_ce(S, P)))
    torch.testing.assert_close(soft_cross_entropy(t(S), t(P), T=2.0), torch.tensor(hand_soft_ce(S, P, 2.0)))


def test_kd_loss_hand_value_and_no_nan_with_zero_probs():
    s = t(S).requires_grad_()
    loss = kd_loss(s, t(P), torch.tensor(Y), alpha=0.3, T=4.0)
    expected = 0.7 * hand_ce(S, Y) + 0.3 * 16.0 * hand_kl(S, P, 4.0)
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_kd_loss_alpha_zero_is_ce_and_alpha_one_is_kl():
    labels = torch.tensor(Y)
    torch.testing.assert_close(kd_loss(t(S), t(P), labels, alpha=0.0, T=4.0), torch.tensor(hand_ce(S, Y)))
    torch.testing.assert_close(kd_loss(t(S), t(P), labels, alpha=1.0, T=2.0),
                               torch.tensor(4.0 * hand_kl(S, P, 2.0)))


def test_kd_loss_mixed_labels():
    # mixed views: the ground truth is lam * onehot(y) + (1 - lam) * onehot(y_partner)
    mixed = [[0.0, 0.75, 0.0, 0.25], [0.0, 0.0, 1.0, 0.0]]
    loss = kd_loss(t(S), t(P), t(mixed), alpha=0.0)
    torch.testing.assert_close(loss, torch.tensor(hand_soft_ce(S, mixed)))


def test_deit_soft_loss():
    for T in (1.0, 2.0):
        expected = 0.5 * hand_ce(S, Y) + 0.5 * T * T * hand_kl(S, P, T)
        torch.testing.assert_close(deit_soft_loss(t(S), t(P), torch.tensor(Y), T=T), torch.tensor(expected))


def test_deit_hard_loss():
    dist = [[0.0, 1.0, 1.0, 2.0], [1.0, 0.0, 0.0, 0.0]]
    hard = [3, 0]
    expected = 0.5 * hand_ce(S, Y) + 0.5 * hand_ce(dist, hard)
    loss = deit_hard_loss(t(S), t(dist), torch.tensor(Y), torch.tensor(hard))
    torch.testing.assert_close(loss, torch.tensor(expected))
    # one head passed twice: the mean of the two cross-entropies on that head
    one_head = deit_hard_loss(t(S), t(S), torch.tensor(Y), torch.tensor(hard))
    torch.testing.assert_close(one_head, torch.tensor(0.5 * hand_ce(S, Y) + 0.5 * hand_ce(S, hard)))


def test_bad_inputs():
    s, p, y = t(S), t(P), torch.tensor(Y)
    with pytest.raises(ValueError, match="T > 0"):
        soft_cross_entropy(s, p, T=-1.0)
    with pytest.raises(ValueError, match="target_probs"):
        soft_cross_entropy(s, p[:, :3])
    with pytest.raises(ValueError, match="T > 0"):
        kd_loss(s, p, y, T=0.0)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, p, y, alpha=1.5)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(s, p, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        kd_loss(s, p, t([1.0, 2.0]))
    with pytest.raises(ValueError, match="student_logits"):
        deit_soft_loss(s[0], p[0], y)
    with pytest.raises(ValueError, match="dist_logits"):
        deit_hard_loss(s, s[:, :2], y, y)
    with pytest.raises(ValueError, match="teacher_hard"):
        deit_hard_loss(s, s, y, torch.tensor([1]))


# -- unbiased sampled cross-entropy --------------------------------------------------------------------


def test_unbiased_sampled_ce_hand_value():
    sampled = [[0, 0, 2], [1, 3, 3]]
    expected = sum(-sum(log_softmax(row)[c] for c in draws) / 3 for row, draws in zip(S, sampled, strict=True)) / 2
    torch.testing.assert_close(unbiased_sampled_ce(t(S), torch.tensor(sampled)), torch.tensor(expected))
    expected_T = sum(-sum(log_softmax(row, 2.0)[c] for c in draws) / 3
                     for row, draws in zip(S, sampled, strict=True)) / 2
    torch.testing.assert_close(unbiased_sampled_ce(t(S), torch.tensor(sampled), T=2.0), torch.tensor(expected_T))


def test_unbiased_sampled_ce_is_unbiased_where_top1_is_not():
    p, s, m = [0.5, 0.3, 0.15, 0.05], [0.0, 1.0, -1.0, 2.0], 20000
    nll = [-v for v in log_softmax(s)]  # -log q_c
    exact = sum(pc * x for pc, x in zip(p, nll, strict=True))
    std_err = math.sqrt(sum(pc * (x - exact) ** 2 for pc, x in zip(p, nll, strict=True)) / m)
    draws = torch.multinomial(t(p), m, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = float(unbiased_sampled_ce(t([s]), draws[None]))
    assert abs(estimate - exact) < 4 * std_err  # std_err is about 0.005
    top1 = nll[0]  # the top-1 label, renormalised: all the mass on class 0
    assert abs(top1 - exact) > 20 * std_err  # off by about 0.25, however many samples


def test_unbiased_sampled_ce_bad_inputs():
    s = t(S)
    with pytest.raises(ValueError, match="outside"):
        unbiased_sampled_ce(s, torch.tensor([[0, 4], [1, 1]]))
    with pytest.raises(ValueError, match="integer"):
        unbiased_sampled_ce(s, t([[0.0], [1.0]]))
    with pytest.raises(ValueError, match="sampled of shape"):
        unbiased_sampled_ce(s, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="T > 0"):
        unbiased_sampled_ce(s, torch.tensor([[0], [1]]), T=0.0)


# -- MEAL V2 -------------------------------------------------------------------------------------------


def test_mealv2_terms_match_their_formulas():
    torch.manual_seed(0)
    disc = LogitDiscriminator(4, hidden=8)
    s = t(S).requires_grad_()
    terms = mealv2_losses(s, t(P), disc)
    assert set(terms) == {"soft_ce", "adv", "disc"} and all(torch.isfinite(v) for v in terms.values())
    with torch.no_grad():
        d_teacher, d_student = disc(t(P)), disc(F.softmax(t(S), dim=1))
    assert d_student.shape == (2,)
    softplus = lambda x: math.log1p(math.exp(x))  # BCE with logits: -log sigmoid(x) = softplus(-x)
    adv = sum(softplus(-float(x)) for x in d_student) / 2
    disc_loss = 0.5 * (sum(softplus(-float(x)) for x in d_teacher) / 2 + sum(softplus(float(x)) for x in d_student) / 2)
    torch.testing.assert_close(terms["soft_ce"], torch.tensor(hand_soft_ce(S, P)))
    torch.testing.assert_close(terms["adv"], torch.tensor(adv))
    torch.testing.assert_close(terms["disc"], torch.tensor(disc_loss))


def test_mealv2_gradients_reach_the_right_parameters():
    torch.manual_seed(0)
    disc = LogitDiscriminator(4, hidden=8)
    s = t(S).requires_grad_()
    terms = mealv2_losses(s, t(P), disc)
    terms["disc"].backward(retain_graph=True)
    assert s.grad is None  # the discriminator's loss sees the student detached
    terms["adv"].backward(inputs=[s])
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_mealv2_discriminator_learns():
    torch.manual_seed(0)
    disc = LogitDiscriminator(4, hidden=16)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    s, p = t(S), t(P)
    losses = []
    for _ in range(30):
        loss = mealv2_losses(s, p, disc)["disc"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]  # from about 0.70 to 0.37


def test_mealv2_bad_inputs():
    with pytest.raises(ValueError, match="discriminator"):
        mealv2_losses(t(S), t(P), None)
    with pytest.raises(ValueError, match=r"expected \(B, 4\)"):
        LogitDiscriminator(4)(torch.zeros(2, 3))


# -- TaT -----------------------------------------------------------------------------------------------


def identity_tat(channels: int) -> TargetAwareTransformer:
    module = TargetAwareTransformer(channels, channels)
    with torch.no_grad():
        for conv in (module.query, module.key, module.value):
            conv.weight.copy_(torch.eye(channels)[:, :, None, None])
    return module


def as_map(vectors: list[list[float]], side: int) -> torch.Tensor:
    """Per-position feature vectors (row-major positions) -> a ``(1, C, side, side)`` map."""
    return t(vectors).t().reshape(1, len(vectors[0]), side, side)


def test_tat_full_hand_value():
    student = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1.0]]
    teacher = [[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, -1.0]]
    loss = 0.0
    for s_i, t_i in zip(student, teacher, strict=True):
        scores = [(s_i[0] * t_j[0] + s_i[1] * t_j[1]) / math.sqrt(2) for t_j in teacher]
        weights = [math.exp(x) / sum(math.exp(y) for y in scores) for x in scores]
        mixed = [sum(w * s_j[c] for w, s_j in zip(weights, student, strict=True)) for c in range(2)]
        loss += sum((mixed[c] - t_i[c]) ** 2 for c in range(2)) / 4  # summed over channels, mean over positions
    module = identity_tat(2)
    torch.testing.assert_close(module(as_map(student, 2), as_map(teacher, 2)), torch.tensor(loss))
    torch.testing.assert_close(tat_loss(as_map(student, 2), as_map(teacher, 2), module), torch.tensor(loss))


def test_tat_patch_is_mean_over_patches():
    torch.manual_seed(0)
    module = TargetAwareTransformer(3, 3)
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    per_patch = [module(f_s[:, :, i:i + 2, j:j + 2], f_t[:, :, i:i + 2, j:j + 2]) for i in (0, 2) for j in (0, 2)]
    torch.testing.assert_close(tat_loss(f_s, f_t, module, variant="patch", groups=2), torch.stack(per_patch).mean())


def test_tat_anchor_is_full_on_pooled_maps():
    torch.manual_seed(0)
    module = TargetAwareTransformer(3, 3)
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected = module(F.avg_pool2d(f_s, 2), F.avg_pool2d(f_t, 2))
    torch.testing.assert_close(tat_loss(f_s, f_t, module, variant="anchor", anchors=2), expected)


def test_tat_pools_a_larger_student_map():
    torch.manual_seed(0)
    module = TargetAwareTransformer(3, 3)
    f_s, f_t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(tat_loss(f_s, f_t, module), module(F.avg_pool2d(f_s, 2), f_t))


def test_tat_projection_backprops():
    torch.manual_seed(0)
    module = TargetAwareTransformer(5, 3)
    f_s = torch.randn(2, 5, 4, 4, requires_grad=True)
    loss = tat_loss(f_s, torch.randn(2, 3, 4, 4), module, variant="patch")
    loss.backward()
    assert isinstance(module.proj, torch.nn.Conv2d) and module.proj.weight.grad is not None
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"variant": "bogus"}, "unknown TaT variant"),
    ({"variant": "patch", "groups": 3}, "dividing both sides"),
    ({"variant": "anchor", "anchors": 5}, "anchors"),
    ({"f_t": torch.zeros(1, 2, 4, 4)}, "channels"),
    ({"f_t": torch.zeros(2, 3, 4, 4)}, "same B"),
    ({"module": None}, "TargetAwareTransformer"),
])
def test_tat_bad_inputs(kwargs, match):
    args = {"f_s": torch.zeros(1, 3, 4, 4), "f_t": torch.zeros(1, 3, 4, 4), "module": TargetAwareTransformer(3, 3)}
    with pytest.raises(ValueError, match=match):
        tat_loss(**{**args, **kwargs})
