"""Each default loss of ``student.losses`` against its authors' formula, transcribed here from the authors' code
(the comment above each names the repository and file), on random tensors of several shapes: values and
gradients within 1e-5 relative. Computed in float64, so the comparison is of formulas, not of rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stillroom.student import losses as L

SHAPES = [(2, 10), (5, 3), (8, 100), (3, 1000)]  # (B, C)
RTOL, ATOL = 1e-5, 1e-12


@pytest.fixture(autouse=True, scope="module")
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def random_case(B: int, C: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, C, generator=g) * 3).requires_grad_()
    t = torch.randn(B, C, generator=g) * 5
    y = torch.randint(0, C, (B,), generator=g)
    return s, t, y


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs, retain_graph=True)


def same_grads(ours: torch.Tensor, ref: torch.Tensor, *inputs: torch.Tensor) -> None:
    for a, b in zip(grads(ours, *inputs), grads(ref, *inputs), strict=True):
        close(a, b)


# torchdistill, torchdistill/losses/single.py (the copy in sihaoevery/TaT): KDLoss, reduction 'batchmean'.
# loss = alpha_td * CE(s, y) + beta_td * T^2 * KLDiv_batchmean(log_softmax(s / T), softmax(t / T)),
# beta_td = 1 - alpha_td
def torchdistill_kd(s, t, y, alpha_td, T):
    soft = F.kl_div(torch.log_softmax(s / T, dim=1), torch.softmax(t / T, dim=1), reduction="batchmean")
    return alpha_td * F.cross_entropy(s, y) + (1 - alpha_td) * T ** 2 * soft


@pytest.mark.parametrize("B, C", SHAPES)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_is_torchdistill_kdloss_with_alpha_on_the_teacher(B, C, T):
    s, t, y = random_case(B, C, B * C)
    ours = L.kd_loss(s, torch.softmax(t / T, 1), y, alpha=0.3, T=T)
    ref = torchdistill_kd(s, t, y, alpha_td=0.7, T=T)  # our alpha weights the teacher; theirs the ground truth
    close(ours, ref)
    same_grads(ours, ref, s)


# facebookresearch/deit, losses.py: DistillationLoss, distillation_type 'soft'.
# kl_div(log_softmax(outputs_kd / T), log_softmax(teacher / T), reduction='sum', log_target=True) * T * T
# / outputs_kd.numel(); loss = base_loss * (1 - alpha) + distillation_loss * alpha
def deit_soft(outputs, outputs_kd, t, y, alpha, T):
    distillation = F.kl_div(F.log_softmax(outputs_kd / T, dim=1), F.log_softmax(t / T, dim=1), reduction="sum",
                            log_target=True) * (T * T) / outputs_kd.numel()
    return F.cross_entropy(outputs, y) * (1 - alpha) + distillation * alpha


@pytest.mark.parametrize("B, C", SHAPES)
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_deit_soft_is_the_authors_sum_over_numel(B, C, T):
    s, t, y = random_case(B, C, 7 * B + C)
    ours = L.deit_soft_loss(s, torch.softmax(t / T, 1), y, alpha=0.5, T=T)
    ref = deit_soft(s, s, t, y, alpha=0.5, T=T)
    close(ours, ref)
    same_grads(ours, ref, s)
    # two heads, as the trainer combines them: (1 - alpha) CE on the class head + alpha * (alpha=1 term) on dist
    dist = (s.detach() * 0.5 + 1).requires_grad_()
    ours2 = 0.5 * F.cross_entropy(s, y) + 0.5 * L.deit_soft_loss(dist, torch.softmax(t / T, 1), y, alpha=1.0, T=T)
    ref2 = deit_soft(s, dist, t, y, alpha=0.5, T=T)
    close(ours2, ref2)
    same_grads(ours2, ref2, s, dist)


# facebookresearch/deit, losses.py (its 'hard' branch, as first released): F.cross_entropy(outputs_kd,
# teacher.argmax(dim=1)); loss = base_loss * (1 - alpha) + distillation_loss * alpha, the paper's alpha = 1/2
@pytest.mark.parametrize("B, C", SHAPES)
def test_deit_hard_is_the_authors_halves(B, C):
    s, t, y = random_case(B, C, 11 * B + C)
    dist = (s.detach().flip(1)).requires_grad_()
    ours = L.deit_hard_loss(s, dist, y, t.argmax(1))
    ref = F.cross_entropy(s, y) * 0.5 + F.cross_entropy(dist, t.argmax(dim=1)) * 0.5
    close(ours, ref)
    same_grads(ours, ref, s, dist)


# szq0214/FKD (the copy in szq0214/MEAL-V2), utils_FKD.py: Recover_soft_label 'marginal_smoothing_k5':
# top-k values scattered, every other class (1 - sum(top-k values)) / (n_classes - k)
@pytest.mark.parametrize("B, C", SHAPES)
def test_soft_targets_at_T1_are_fkd_marginal_smoothing(B, C):
    _, t, _ = random_case(B, C, 13 * B + C)
    k = min(5, C - 1)
    p = torch.softmax(t, 1)
    value, index = p.topk(k, 1)
    minor = ((torch.ones(B, 1) - value.sum(1, keepdim=True)) / (C - k)).repeat_interleave(C, dim=1)
    fkd = (minor * torch.ones(B, C)).scatter_(1, index, value)
    logits, idx = t.topk(k, 1)
    tail_lse = torch.logsumexp(t.scatter(1, idx, float("-inf")), 1)
    close(L.soft_targets_from_topk(idx, logits, tail_lse, C, T=1.0), fkd)


# szq0214/MEAL-V2: models/discriminator.py (three 1x1 convs, ReLU after each, built with K = 8 in train.py),
# loss.py discriminatorLoss (cat(student, teacher) rows, targets [1, 0] then [0, 1], BCEWithLogitsLoss),
# extensions/kd_loss.py KLLoss (-bmm(soft_labels, log_softmax(output)), mean), train.py: g_loss + d_loss, one
# backward. (The authors feed the discriminator raw logits; stillroom feeds probabilities: see mealv2_losses.)
def meal_v2(s_in, t_in, soft_labels, output, convs):
    x = torch.cat([s_in, t_in], 0)[:, :, None, None]
    for conv in convs:
        x = F.relu(conv(x))
    x = x.view(x.size(0), -1)
    half = x.size(0) // 2
    target = torch.tensor([[1.0, 0.0]] * half + [[0.0, 1.0]] * half)
    d_loss = torch.nn.BCEWithLogitsLoss()(x, target)
    g_loss = -torch.bmm(soft_labels.unsqueeze(1), F.log_softmax(output, dim=1).unsqueeze(2)).mean()
    return g_loss + d_loss


@pytest.mark.parametrize("B, C", SHAPES)
def test_mealv2_is_the_authors_joint_objective(B, C):
    s, t, _ = random_case(B, C, 17 * B + C)
    torch.manual_seed(C)
    disc = L.MealDiscriminator(C)
    with torch.no_grad():  # keep every ReLU open so the gradients are not all zero
        for layer in disc.net:
            if isinstance(layer, torch.nn.Linear):
                layer.bias.add_(0.5)
    convs = []
    for layer in disc.net:
        if isinstance(layer, torch.nn.Linear):
            conv = torch.nn.Conv2d(layer.in_features, layer.out_features, kernel_size=1, stride=1, bias=True)
            with torch.no_grad():
                conv.weight.copy_(layer.weight[:, :, None, None])
                conv.bias.copy_(layer.bias)
            convs.append(conv)
    p = torch.softmax(t, 1)
    terms = L.mealv2_losses(s, p, disc)
    ours = terms["soft_ce"] + terms["disc"]
    ref = meal_v2(torch.softmax(s, 1), p, p, s, convs)
    close(ours, ref)
    same_grads(ours, ref, s)
    ours_w = grads(ours, *[m.weight for m in disc.net if isinstance(m, torch.nn.Linear)])
    ref_w = grads(ref, *[c.weight for c in convs])
    for a, b in zip(ours_w, ref_w, strict=True):
        close(a, b[:, :, 0, 0])


# sihaoevery/TaT, torchdistill/losses/single.py MaskedFM.batch_loss (heads 1): q, k, v rearranged
# 'b (h d) x y -> b h (x y) d'; sim = einsum(q, k).softmax(-1) (no scaling); out = einsum(sim, v);
# back to (b, c, h, w); loss = nn.MSELoss()(out, t)
def masked_fm(q, k, v, t, heads):
    b, c, h, w = v.shape
    re = lambda x: x.reshape(b, heads, c // heads, h * w).permute(0, 1, 3, 2)  # noqa: E731
    q, k, v = re(q), re(k), re(v)
    sim = torch.einsum("bhid,bhjd->bhij", q, k).softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", sim, v)
    out = out.permute(0, 1, 3, 2).reshape(b, c, h, w)
    return torch.nn.MSELoss()(out, t)


# sihaoevery/TaT-seg, distiller_tat.py: grid_tensor_seq (unfold into n x m patches of h // n x w // m), the
# 'stack_attn' reshape (patches stacked along channels, patch-major), sub_loss with `heads` heads
def grid_tensor_seq(x, n, m):
    kh, kw = x.shape[2] // n, x.shape[3] // m
    temp = x.unfold(2, kh, kh).unfold(3, kw, kw)
    return temp.contiguous().view(temp.size(0), temp.size(1), -1, temp.size(4), temp.size(5))


def patchgroup(q, k, v, f_t, n, heads):
    q, k, v, f_t = (grid_tensor_seq(x, n, n) for x in (q, k, v, f_t))
    stack = lambda x: x.permute(0, 2, 1, 3, 4).reshape(x.size(0), -1, x.size(3), x.size(4))  # noqa: E731
    return masked_fm(stack(q), stack(k), stack(v), stack(f_t), heads)


# TaT-seg distiller_tat.py distillation_anchorpoint: AvgPool2d(kernel = stride = [h // anchor_h, w // anchor_w])
# on q, k, v and f_t, then sub_loss with one head
def anchorpoint(q, k, v, f_t, a):
    kernel = [q.size(2) // a, q.size(3) // a]
    pool = torch.nn.AvgPool2d(kernel, kernel)
    return masked_fm(pool(q), pool(k), pool(v), pool(f_t), 1)


TAT_CASES = [(2, 6, 4, 4), (3, 8, 8, 8), (2, 16, 6, 6), (4, 5, 7, 7)]  # B, C_t, H, W


@pytest.mark.parametrize("B, C, H, W", TAT_CASES)
@pytest.mark.parametrize("variant", ["full", "patch", "anchor", "patch-anchor"])
def test_tat_is_the_reference(B, C, H, W, variant):
    g = torch.Generator().manual_seed(B * C * H)
    f_s = torch.randn(B, 5, H, W, generator=g).requires_grad_()
    f_t = torch.randn(B, C, H, W, generator=g)
    torch.manual_seed(C)
    module = L.TargetAwareTransformer(5, C, L.tat_embedding_form(variant))
    groups, per_group, anchors = 2, 2, 2
    ours = L.tat_loss(f_s, f_t, module, variant=variant, groups=groups, patches_per_group=per_group, anchors=anchors)
    q, k, v = module(f_s, f_t)
    if variant == "full":
        ref = masked_fm(q, f_t, v, f_t, heads=1)  # ImageNet code: the key is the teacher map itself
        assert isinstance(module.key, torch.nn.Identity)
    else:
        ref = torch.zeros(())
        if variant in ("patch", "patch-anchor"):
            ref = ref + patchgroup(q, k, v, f_t, groups, heads=groups * groups // per_group)
        if variant in ("anchor", "patch-anchor"):
            ref = ref + anchorpoint(q, k, v, f_t, anchors)
    close(ours, ref)
    params = [f_s, *module.parameters()]
    for a, b in zip(grads(ours, *params), grads(ref, *params), strict=True):
        close(a, b)
