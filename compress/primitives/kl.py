"""KL divergence and top-1 agreement between two models' next-token distributions, position by position."""

from __future__ import annotations

import torch


def kl_top1(base_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., V] logits of base and result -> ([...] KL(base || result) in nats, [...] bool same argmax)."""
    p = torch.log_softmax(base_logits.float(), dim=-1)
    q = torch.log_softmax(logits.float(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1).clamp_min_(0.0)  # >= 0; rounding can make a tiny negative
    return kl, base_logits.argmax(-1) == logits.argmax(-1)
