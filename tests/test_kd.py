"""The sparse top-k KD loss against dense references, and its gradients."""

import pytest
import torch

from trainer.losses.topk_kd import topk_kd_loss


def dense_reference(student_logits, teacher_logits, temperature, beta):
    """T^2 * ((1-beta) KL(p_t || p_s) + beta KL(p_s || p_t)) over the whole vocabulary."""
    s = torch.log_softmax(student_logits.double() / temperature, -1)
    t = torch.log_softmax(teacher_logits.double() / temperature, -1)
    forward = (t.exp() * (t - s)).sum(-1)
    reverse = (s.exp() * (s - t)).sum(-1)
    return ((1 - beta) * forward + beta * reverse).mean() * temperature ** 2


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature, beta", [(1.0, 0.0), (2.0, 0.0), (0.7, 0.5), (1.5, 1.0)])
def test_with_the_whole_vocabulary_as_top_k_the_loss_is_the_dense_kl(tail, temperature, beta):
    torch.manual_seed(0)
    n, vocab = 7, 50
    student = torch.randn(n, vocab) * 3
    teacher = torch.randn(n, vocab) * 3
    lp = torch.log_softmax(teacher, -1)
    values, ids = lp.sort(-1, descending=True)
    got = topk_kd_loss(student, ids, values, temperature, beta, tail, chunk=3)
    want = dense_reference(student, teacher, temperature, beta)
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, want.item())
    # the caller's log-sum-exp (the trainer shares the cross-entropy's) gives the same loss
    shared = topk_kd_loss(student, ids, values, temperature, beta, tail,
                          lse=torch.logsumexp(student, -1))
    assert torch.allclose(shared, got, rtol=1e-6, atol=1e-7)


def test_bucket_mode_is_the_kl_of_the_coarsened_distributions():
    torch.manual_seed(1)
    n, vocab, k = 5, 40, 6
    student, teacher = torch.randn(n, vocab), torch.randn(n, vocab)
    lp = torch.log_softmax(teacher, -1)
    values, ids = lp.topk(k, -1)
    ps = torch.softmax(student.double(), -1)
    pt = lp.double().exp()
    inside_s, inside_t = ps.gather(1, ids), pt.gather(1, ids)
    cs = torch.cat([inside_s, 1 - inside_s.sum(-1, keepdim=True)], 1)
    ct = torch.cat([inside_t, 1 - inside_t.sum(-1, keepdim=True)], 1)
    want = (ct * (ct.log() - cs.log())).sum(-1).mean()
    got = topk_kd_loss(student, ids, values)
    assert abs(got.item() - want.item()) < 1e-5


def test_unknown_ids_fold_into_the_bucket_and_empty_input_is_zero():
    torch.manual_seed(2)
    student, teacher = torch.randn(3, 30), torch.randn(3, 30)
    values, ids = torch.log_softmax(teacher, -1).topk(5, -1)
    full = topk_kd_loss(student, ids, values)
    ids2, values2 = ids.clone(), values.clone()
    ids2[:, -1] = -1  # the 5th entry's id is unknown: its mass joins the bucket
    partial = topk_kd_loss(student, ids2, values2)
    fewer = topk_kd_loss(student, ids[:, :4], values[:, :4])
    assert torch.isfinite(partial) and abs(partial.item() - fewer.item()) < 1e-6
    assert partial.item() <= full.item() + 1e-6  # a coarser partition never has more KL
    empty = topk_kd_loss(torch.zeros(0, 30, requires_grad=True), ids[:0], values[:0])
    assert empty.item() == 0.0
    empty.backward()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_gradients_match_finite_differences_on_a_tiny_model(tail):
    """A tiny model (hidden states times an output matrix); gradcheck in float64."""
    torch.manual_seed(3)
    hidden = torch.randn(4, 6, dtype=torch.float64)
    weight = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    values, ids = torch.log_softmax(torch.randn(4, 12, dtype=torch.float64), -1).topk(5, -1)

    def loss(w):
        return topk_kd_loss(hidden @ w, ids, values, temperature=1.7, beta=0.3, tail=tail)

    assert torch.autograd.gradcheck(loss, (weight,), eps=1e-6, atol=1e-6)


def test_bf16_logits_are_computed_in_float32():
    torch.manual_seed(4)
    student, teacher = torch.randn(6, 64), torch.randn(6, 64)
    values, ids = torch.log_softmax(teacher, -1).topk(8, -1)
    exact = topk_kd_loss(student, ids, values)
    half = topk_kd_loss(student.bfloat16(), ids, values)
    assert half.dtype == torch.float32 and abs(half.item() - exact.item()) < 0.05


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_gradients_stay_finite_when_the_top_k_holds_all_the_mass(tail):
    """A confident student (its top k hold all but ~3e-8 of its mass) and a row without known
    ids: finite loss and gradients."""
    student = torch.full((3, 20), 10.0)   # 15 tokens outside the top k: ~3e-8 of the mass
    student[:, 0] = 30.0
    student[:, 1:5] = -30.0
    student.requires_grad_(True)
    teacher_ids = torch.arange(5).repeat(3, 1)
    teacher_lps = torch.log_softmax(torch.tensor([[5.0, 1.0, 0.0, -1.0, -2.0]]), -1).repeat(3, 1)
    teacher_ids[2] = -1  # a row without any known id
    loss = topk_kd_loss(student, teacher_ids, teacher_lps, 2.0, 0.5, tail)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_log1mexp_has_finite_gradients_everywhere_it_is_used():
    """Both branches of a `where` are differentiated; the unused one must not give NaN (it did
    at x = -1e-12 before, and a training run's gradients went NaN at its second step)."""
    from trainer.losses.topk_kd import _log1mexp

    x = torch.tensor([0.0, -1e-13, -1e-12, -5.96e-8, -1.19e-7, -1e-6, -0.5, -0.7, -5.0, -100.0,
                      -3e38], requires_grad=True)
    y = _log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    ref = torch.log(-torch.expm1(torch.tensor([-0.5, -5.0], dtype=torch.float64)))
    assert torch.allclose(y[[6, 8]].double(), ref, atol=1e-6)
