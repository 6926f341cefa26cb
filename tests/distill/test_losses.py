"""Distillation losses against values computed by hand."""

import math

import pytest
import torch

from compress.distill import losses
from compress.distill.losses import hidden_loss, kl_and_next_token, layer_map, lm_loss, logit_loss

# One position, two tokens: teacher p = [0.75, 0.25], student q = [0.5, 0.5].
TEACHER = torch.tensor([[[math.log(3.0), 0.0]]])
STUDENT = torch.tensor([[[0.0, 0.0]]])


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_forward_kl():
    assert logit_loss(STUDENT, TEACHER, kind="kl").item() == pytest.approx(kl([0.75, 0.25], [0.5, 0.5]), abs=1e-6)


def test_reverse_kl():
    assert logit_loss(STUDENT, TEACHER, kind="reverse-kl").item() == pytest.approx(
        kl([0.5, 0.5], [0.75, 0.25]), abs=1e-6
    )


def test_jensen_shannon():
    m = [0.625, 0.375]
    expected = 0.5 * (kl([0.75, 0.25], m) + kl([0.5, 0.5], m))
    assert logit_loss(STUDENT, TEACHER, kind="jsd").item() == pytest.approx(expected, abs=1e-6)
    assert logit_loss(STUDENT, TEACHER, kind="jsd").item() <= math.log(2)


def test_temperature_softens_and_scales_by_t_squared():
    # T = 2 halves the logits: teacher p = softmax([ln 3 / 2, 0]) = [sqrt3, 1] / (sqrt3 + 1)
    p = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    expected = 4 * kl(p, [0.5, 0.5])
    assert logit_loss(STUDENT, TEACHER, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)


def test_identical_logits_give_zero():
    x = torch.randn(2, 5, 11)
    for kind in ("kl", "reverse-kl", "jsd"):
        assert logit_loss(x, x.clone(), kind=kind).item() == pytest.approx(0.0, abs=1e-6)


def test_mask_drops_positions():
    s = torch.cat([STUDENT, torch.zeros(1, 1, 2)], dim=1)  # second position: identical logits
    t = torch.cat([TEACHER, torch.zeros(1, 1, 2)], dim=1)
    both = logit_loss(s, t).item()
    first = logit_loss(s, t, mask=torch.tensor([[1, 0]])).item()
    assert first == pytest.approx(2 * both, abs=1e-6) and first == pytest.approx(kl([0.75, 0.25], [0.5, 0.5]), abs=1e-6)


def test_hidden_mse_is_relative_to_the_teacher_scale():
    t = torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])  # mean square (1 + 1 + 4 + 0) / 4 = 1.5
    s = t + torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # squared error per position: 1, 0
    assert hidden_loss(s, t, "mse").item() == pytest.approx(((1 + 0) / 2) / 1.5, abs=1e-6)
    assert hidden_loss(10 * s, 10 * t, "mse").item() == pytest.approx(((1 + 0) / 2) / 1.5, abs=1e-5)


def test_hidden_cosine():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    t = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])  # cosines 0 and 1
    assert hidden_loss(s, t, "cosine").item() == pytest.approx(0.5, abs=1e-6)


def test_lm_loss_is_shifted_cross_entropy():
    logits, ids = torch.randn(2, 6, 13), torch.randint(0, 13, (2, 6))
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1))
    assert lm_loss(logits, ids).item() == pytest.approx(expected.item(), abs=1e-6)


def test_layer_map():
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(2, 4) == [1, 3]
    m = layer_map(20, 30)
    assert len(m) == 20 and m[-1] == 29 and all(a < b for a, b in zip(m, m[1:]))
    with pytest.raises(ValueError, match="more layers"):
        layer_map(5, 4)


@pytest.mark.parametrize("kd, lm, temperature", [(1.0, 1.0, 1.0), (0.5, 2.0, 2.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.5)])
def test_fused_kl_and_next_token_matches_autograd(kd, lm, temperature):
    """Value and gradient of the one-pass loss equal the two autograd losses' weighted sum; 300 positions cross
    the chunk boundary unevenly (128 a chunk)."""
    g = torch.Generator().manual_seed(0)
    s, t = (3 * torch.randn(2, 150, 97, generator=g, dtype=torch.float64) for _ in range(2))
    ids = torch.randint(0, 97, (2, 150), generator=g)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    ref = kd * logit_loss(a, t, temperature) + lm * lm_loss(a, ids)
    ref.backward()
    total, kd_part, lm_part = kl_and_next_token(b, t, ids, kd, lm, temperature)
    total.backward()
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    assert kd_part.item() == pytest.approx(kd * logit_loss(s, t, temperature).item(), rel=1e-5, abs=1e-9)
    assert lm_part.item() == pytest.approx(lm * lm_loss(s, ids).item(), rel=1e-5, abs=1e-9)
    assert not kd_part.requires_grad and not lm_part.requires_grad
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-9)
    assert s.shape[0] * s.shape[1] > 2 * losses.CHUNK


def test_fused_loss_keeps_bfloat16_logits_bfloat16():
    """Under autocast the logits are bfloat16: the stored gradient stays bfloat16 (half the memory) and within
    bfloat16's rounding of the float32 gradient."""
    g = torch.Generator().manual_seed(1)
    s, t = (torch.randn(1, 40, 50, generator=g) for _ in range(2))
    ids = torch.randint(0, 50, (1, 40), generator=g)
    a, b = s.clone().requires_grad_(), s.bfloat16().requires_grad_()
    kl_and_next_token(a, t, ids, 1.0, 1.0)[0].backward()
    kl_and_next_token(b, t.bfloat16(), ids, 1.0, 1.0)[0].backward()
    assert b.grad.dtype == torch.bfloat16
    assert (b.grad.float() - a.grad).abs().max() < 0.02 * a.grad.abs().max()
