"""The losses of ``student.losses`` against values worked out from their formulas on tiny fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stillroom.student.losses import (
    LogitDiscriminator,
    MealDiscriminator,
    TargetAwareTransformer,
    deit_hard_loss,
    deit_soft_loss,
    kd_loss,
    make_discriminator,
    mealv2_losses,
    soft_cross_entropy,
    soft_targets_from_topk,
    tat_attend,
    tat_embedding_form,
    tat_loss,
    unbiased_sampled_ce,
)
from stillroom.student.methods import method_names

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
    assert method_names() == ("ce", "kd", "deit-soft", "deit-hard", "mealv2", "sampled", "tat")


# -- soft_targets_from_topk ----------------------------------------------------------------------------


def test_soft_targets_exact_topk_and_even_tail():
    # row 0: top-2 probabilities 0.5 and 0.2 (lse 0); tail mass 0.3, 0.15 to each of classes 2 and 3
    # row 1: top-2 probabilities 0.6 and 0.3 (logits shifted by lse = 2); tail 0.1, 0.05 to classes 0 and 2
    idx = torch.tensor([[1, 0], [3, 1]])
    logit = t([[math.log(0.5), math.log(0.2)], [math.log(0.6) + 2, math.log(0.3) + 2]])
    tail_lse = t([math.log(0.3), math.log(0.1) + 2])
    q = soft_targets_from_topk(idx, logit, tail_lse, num_classes=4)
    expected = t([[0.2, 0.5, 0.15, 0.15], [0.05, 0.3, 0.05, 0.6]])
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(2))


def test_soft_targets_from_real_teacher_logits():
    logits = [2.0, 1.0, 0.0, -1.0]
    z = sum(math.exp(x) for x in logits)
    tail = (math.exp(0.0) + math.exp(-1.0)) / z / 2
    tail_lse = math.log(math.exp(0.0) + math.exp(-1.0))
    q = soft_targets_from_topk(torch.tensor([[0, 1]]), t([[2.0, 1.0]]), t([tail_lse]), num_classes=4)
    torch.testing.assert_close(q, t([[math.exp(2.0) / z, math.exp(1.0) / z, tail, tail]]))


def test_soft_targets_tempered_puts_the_tail_at_equal_logits():
    # logits 2, 1 (top-2) and a tail of two classes holding exp(0) + exp(-1): each at log((1 + e^-1) / 2)
    T, tail_lse = 2.0, math.log(1 + math.exp(-1.0))
    equal = tail_lse - math.log(2)
    q = soft_targets_from_topk(torch.tensor([[0, 1]]), t([[2.0, 1.0]]), t([tail_lse]), 4, T=T)
    w = [math.exp(2.0 / T), math.exp(1.0 / T), math.exp(equal / T), math.exp(equal / T)]
    torch.testing.assert_close(q, t([[x / sum(w) for x in w]]))


def test_soft_targets_a_confident_teacher_keeps_its_tail_at_high_T():
    # margin 30: the tail's mass e^-30 is far below float16 and float32 rounding of 1 - p_top, yet at T = 8
    # softmax(t / 8) gives the tail classes e^(-30/8) of the top's weight: the rebuild must keep that
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0]])
    tail_lse = torch.logsumexp(logits[:, 1:], 1)
    q = soft_targets_from_topk(torch.tensor([[0]]), logits[:, :1].half(), tail_lse, 4, T=8.0)
    torch.testing.assert_close(q, torch.softmax(logits / 8.0, 1))


def test_soft_targets_tempered_is_exact_with_all_classes():
    logits, T = [2.0, 1.0, 0.0, -1.0], 3.0
    q = soft_targets_from_topk(torch.tensor([[0, 1, 2, 3]]), t([logits]), t([float("-inf")]), 4, T=T)
    z_T = sum(math.exp(x / T) for x in logits)
    torch.testing.assert_close(q, t([[math.exp(x / T) / z_T for x in logits]]))


@pytest.mark.parametrize("kwargs, match", [
    ({"T": 0.0}, "T > 0"),
    ({"num_classes": 1}, "num_classes >= k"),
    ({"tail_lse": t([0.0])}, "tail_lse"),
    ({"topk_logit": t([[0.0], [0.0]])}, "topk_logit"),
    ({"topk_idx": torch.tensor([[0, 4], [1, 2]])}, "outside"),
])
def test_soft_targets_bad_inputs(kwargs, match):
    args = {"topk_idx": torch.tensor([[0, 1], [1, 2]]), "topk_logit": t([[0.0, -1.0], [0.0, -1.0]]),
            "tail_lse": t([1.0, 1.0]), "num_classes": 4, "T": 1.0}
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


def test_deit_soft_loss_divides_the_summed_kl_by_b_times_c():
    C = len(S[0])
    for T in (1.0, 2.0):  # hand_kl is the per-sample KL averaged over the batch: sum / B
        expected = 0.5 * hand_ce(S, Y) + 0.5 * T * T * hand_kl(S, P, T) / C
        torch.testing.assert_close(deit_soft_loss(t(S), t(P), torch.tensor(Y), T=T), torch.tensor(expected))
        per_sample = 0.5 * hand_ce(S, Y) + 0.5 * T * T * hand_kl(S, P, T)
        torch.testing.assert_close(deit_soft_loss(t(S), t(P), torch.tensor(Y), T=T, reduction="batch"),
                                   torch.tensor(per_sample))
    with pytest.raises(ValueError, match="reduction"):
        deit_soft_loss(t(S), t(P), torch.tensor(Y), reduction="mean")


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


def test_mealv2_authors_discriminator_widths():
    assert MealDiscriminator(1000).widths == (1000, 125, 15, 2)  # MEAL-V2 train.py: K = 8
    assert MealDiscriminator(10).widths == (10, 8, 4, 2)
    out = MealDiscriminator(10)(torch.randn(3, 10))
    assert out.shape == (3, 2) and (out >= 0).all()  # a ReLU after the last layer too


def test_mealv2_authors_terms_match_their_formulas():
    torch.manual_seed(0)
    disc = MealDiscriminator(4)
    terms = mealv2_losses(t(S), t(P), disc)
    assert set(terms) == {"soft_ce", "disc"}
    with torch.no_grad():
        d_student, d_teacher = disc(F.softmax(t(S), dim=1)), disc(t(P))
    softplus = lambda x: math.log1p(math.exp(x))  # BCE with logits: target 1 -> softplus(-x), 0 -> softplus(x)
    entries = [softplus(-float(r[0])) + softplus(float(r[1])) for r in d_student]  # student rows: (1, 0)
    entries += [softplus(float(r[0])) + softplus(-float(r[1])) for r in d_teacher]  # teacher rows: (0, 1)
    torch.testing.assert_close(terms["disc"], torch.tensor(sum(entries) / 8))
    torch.testing.assert_close(terms["soft_ce"], torch.tensor(hand_soft_ce(S, P)))


def _alive(disc: torch.nn.Module) -> None:
    """Positive biases: the authors' last ReLU outputs 0 (no gradient) for some inits; start above it."""
    with torch.no_grad():
        for layer in disc.net:
            if isinstance(layer, torch.nn.Linear):
                layer.bias.fill_(0.5)


def test_mealv2_authors_one_backward_trains_both_and_the_student_lowers_the_disc_loss():
    torch.manual_seed(0)
    disc = MealDiscriminator(4)
    _alive(disc)
    s = t(S).requires_grad_()
    disc_only = mealv2_losses(s, t(P), disc)["disc"]
    (g,) = torch.autograd.grad(disc_only, s, retain_graph=True)
    assert g.abs().sum() > 0  # not detached: the student gets the discriminator's gradient (the regulariser)
    disc_only.backward()
    assert all(p.grad is not None for p in disc.parameters())


def test_mealv2_gan_terms_match_their_formulas():
    torch.manual_seed(0)
    disc = LogitDiscriminator(4, hidden=8)
    s = t(S).requires_grad_()
    terms = mealv2_losses(s, t(P), disc, form="gan")
    assert set(terms) == {"soft_ce", "adv", "disc"} and all(torch.isfinite(v) for v in terms.values())
    with torch.no_grad():
        d_teacher, d_student = disc(t(P)), disc(F.softmax(t(S), dim=1))
    assert d_student.shape == (2,)
    softplus = lambda x: math.log1p(math.exp(x))
    adv = sum(softplus(-float(x)) for x in d_student) / 2
    disc_loss = 0.5 * (sum(softplus(-float(x)) for x in d_teacher) / 2 + sum(softplus(float(x)) for x in d_student) / 2)
    torch.testing.assert_close(terms["soft_ce"], torch.tensor(hand_soft_ce(S, P)))
    torch.testing.assert_close(terms["adv"], torch.tensor(adv))
    torch.testing.assert_close(terms["disc"], torch.tensor(disc_loss))


def test_mealv2_gan_gradients_reach_the_right_parameters():
    torch.manual_seed(0)
    disc = LogitDiscriminator(4, hidden=8)
    s = t(S).requires_grad_()
    terms = mealv2_losses(s, t(P), disc, form="gan")
    terms["disc"].backward(retain_graph=True)
    assert s.grad is None  # the discriminator's loss sees the student detached
    terms["adv"].backward(inputs=[s])
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_mealv2_discriminator_learns():
    for form in ("authors", "gan"):
        torch.manual_seed(0)
        disc = make_discriminator(4, form)
        if form == "authors":
            _alive(disc)
        opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
        s, p = t(S), t(P)
        losses = []
        for _ in range(100):
            loss = mealv2_losses(s, p, disc, form=form)["disc"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        # the authors' last ReLU floors the logits at 0, so its loss falls slowly (floor 0.5 log 2): 0.71 -> 0.62
        assert losses[-1] < (0.92 if form == "authors" else 0.8) * losses[0], form


def test_mealv2_bad_inputs():
    with pytest.raises(ValueError, match="discriminator"):
        mealv2_losses(t(S), t(P), None)
    with pytest.raises(ValueError, match="MEAL V2 form"):
        mealv2_losses(t(S), t(P), MealDiscriminator(4), form="wgan")
    with pytest.raises(ValueError, match=r"expected \(B, 4\)"):
        MealDiscriminator(4)(torch.zeros(2, 3))


# -- TaT -----------------------------------------------------------------------------------------------


def as_map(vectors: list[list[float]], side: int) -> torch.Tensor:
    """Per-position feature vectors (row-major positions) -> a ``(1, C, side, side)`` map."""
    return t(vectors).t().reshape(1, len(vectors[0]), side, side)


def test_tat_attend_hand_value_has_no_sqrt_d():
    q = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1.0]]
    k = [[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, -1.0]]
    v = [[1.0, 2.0], [3.0, 0.0], [-1.0, 1.0], [0.0, 0.5]]
    out = []
    for q_i in q:
        scores = [q_i[0] * k_j[0] + q_i[1] * k_j[1] for k_j in k]  # not divided by sqrt(2)
        weights = [math.exp(x) / sum(math.exp(y) for y in scores) for x in scores]
        out.append([sum(w * v_j[c] for w, v_j in zip(weights, v, strict=True)) for c in range(2)])
    got = tat_attend(as_map(q, 2), as_map(k, 2), as_map(v, 2))
    torch.testing.assert_close(got, as_map(out, 2))


def test_tat_embeddings_follow_each_reference():
    imagenet, seg = TargetAwareTransformer(5, 3), TargetAwareTransformer(5, 3, form="seg")
    assert imagenet.query.conv.kernel_size == (3, 3) and isinstance(imagenet.key, torch.nn.Identity)
    assert isinstance(imagenet.query.norm, torch.nn.BatchNorm2d) and imagenet.value.conv.out_channels == 3
    assert seg.query.conv.kernel_size == (1, 1) and seg.key.conv.kernel_size == (1, 1)
    assert tat_embedding_form("full") == "imagenet" and tat_embedding_form("patch-anchor") == "seg"


def test_tat_full_is_the_mse_of_the_reassembled_student_against_the_teacher_map():
    torch.manual_seed(0)
    module = TargetAwareTransformer(5, 3)
    f_s, f_t = torch.randn(2, 5, 4, 4), torch.randn(2, 3, 4, 4)
    q, k, v = module(f_s, f_t)
    torch.testing.assert_close(k, f_t)  # the key is the teacher map itself
    expected = ((tat_attend(q, k, v) - f_t) ** 2).mean()
    torch.testing.assert_close(tat_loss(f_s, f_t, module), expected)


def test_tat_patch_groups_of_one_are_the_mean_over_patches():
    torch.manual_seed(0)
    module = TargetAwareTransformer(3, 3, form="seg")
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    q, k, v = module(f_s, f_t)
    per_patch = [F.mse_loss(tat_attend(*(x[:, :, i:i + 2, j:j + 2] for x in (q, k, v))), f_t[:, :, i:i + 2, j:j + 2])
                 for i in (0, 2) for j in (0, 2)]
    got = tat_loss(f_s, f_t, module, variant="patch", groups=2, patches_per_group=1)
    torch.testing.assert_close(got, torch.stack(per_patch).mean())


def test_tat_patch_group_shares_one_attention_across_its_patches():
    torch.manual_seed(0)
    module = TargetAwareTransformer(3, 3, form="seg")
    f_s, f_t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    q, k, v = module(f_s, f_t)
    patches = [(i, j) for i in (0, 2) for j in (0, 2)]  # row-major: groups of 2 are (top-left, top-right), ...
    cut = lambda x, ij: x[:, :, ij[0]:ij[0] + 2, ij[1]:ij[1] + 2].flatten(2).transpose(1, 2)  # (1, 4, C)
    total = 0.0
    for a, b in ((patches[0], patches[1]), (patches[2], patches[3])):
        sim = cut(q, a) @ cut(k, a).transpose(1, 2) + cut(q, b) @ cut(k, b).transpose(1, 2)
        attn = torch.softmax(sim, -1)
        total = total + ((attn @ cut(v, a) - cut(f_t, a)) ** 2).sum() + ((attn @ cut(v, b) - cut(f_t, b)) ** 2).sum()
    got = tat_loss(f_s, f_t, module, variant="patch", groups=2, patches_per_group=2)
    torch.testing.assert_close(got, total / f_t.numel())


def test_tat_anchor_pools_with_kernel_h_over_a():
    torch.manual_seed(0)
    module = TargetAwareTransformer(3, 3, form="seg")
    f_s, f_t = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    q, k, v = module(f_s, f_t)
    pool = lambda x: F.avg_pool2d(x, 2, 2)  # 5 // 2 = 2: a 2x2 grid, the last row and column left out
    expected = F.mse_loss(tat_attend(pool(q), pool(k), pool(v)), pool(f_t))
    torch.testing.assert_close(tat_loss(f_s, f_t, module, variant="anchor", anchors=2), expected)
    both = tat_loss(f_s, f_t, module, variant="patch-anchor", groups=2, patches_per_group=2, anchors=2)
    patch = tat_loss(f_s, f_t, module, variant="patch", groups=2, patches_per_group=2)
    torch.testing.assert_close(both, patch + expected)


def test_tat_pools_a_larger_student_map():
    torch.manual_seed(0)
    module = TargetAwareTransformer(3, 3).eval()
    f_s, f_t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(tat_loss(f_s, f_t, module), tat_loss(F.avg_pool2d(f_s, 2), f_t, module))


def test_tat_embeddings_backprop():
    torch.manual_seed(0)
    module = TargetAwareTransformer(5, 3, form="seg")
    f_s = torch.randn(2, 5, 4, 4, requires_grad=True)
    loss = tat_loss(f_s, torch.randn(2, 3, 4, 4), module, variant="patch-anchor")
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"variant": "bogus"}, "unknown TaT variant"),
    ({"variant": "patch", "groups": 5}, "patches per side"),
    ({"variant": "patch", "patches_per_group": 3}, "divisor"),
    ({"variant": "anchor", "anchors": 5}, "anchors"),
    ({"f_t": torch.zeros(1, 2, 4, 4)}, "channels"),
    ({"f_t": torch.zeros(2, 3, 4, 4)}, "same B"),
    ({"module": None}, "TargetAwareTransformer"),
])
def test_tat_bad_inputs(kwargs, match):
    args = {"f_s": torch.zeros(1, 3, 4, 4), "f_t": torch.zeros(1, 3, 4, 4), "module": TargetAwareTransformer(3, 3)}
    with pytest.raises(ValueError, match=match):
        tat_loss(**{**args, **kwargs})
