"""Distillation losses: pure functions of logits and hidden states.

Shapes: logits [B, T, V], hidden states [B, T, H]; `mask` [B, T] marks the positions that
count (all of them when None). Every loss is a mean over the counted positions.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LogitLoss = Literal["kl", "reverse-kl", "jsd"]
HiddenLoss = Literal["mse", "cosine"]


def _mean(per_pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T] -> scalar mean over the counted positions."""
    if mask is None:
        return per_pos.mean()
    mask = mask.to(per_pos.dtype)
    return (per_pos * mask).sum() / mask.sum().clamp(min=1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities: [B, T, V] -> [B, T]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def logit_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    kind: LogitLoss = "kl",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence between temperature-softened distributions, times T^2 (Hinton et al.), so
    gradients keep their scale as T changes.

    kl:         KL(teacher || student), mean-seeking (the student covers every teacher mode)
    reverse-kl: KL(student || teacher), mode-seeking
    jsd:        Jensen-Shannon, KL of each to their mixture, halved (bounded by log 2)
    """
    s = F.log_softmax(student.float() / temperature, dim=-1)  # [B, T, V]
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "kl":
        per_pos = _kl(t, s)
    elif kind == "reverse-kl":
        per_pos = _kl(s, t)
    elif kind == "jsd":
        m = torch.logsumexp(torch.stack([s, t]), dim=0) - torch.log(torch.tensor(2.0))  # log((p + q) / 2)
        per_pos = 0.5 * (_kl(t, m) + _kl(s, m))
    else:
        raise ValueError(f"unknown logit loss {kind!r}")
    return _mean(per_pos, mask) * temperature**2


def hidden_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: HiddenLoss = "mse", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """mse: mean squared difference per position (averaged over the hidden size), divided by
    the teacher's mean square so layers of any scale weigh alike; cosine: 1 - cosine similarity."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        per_pos = (s - t).pow(2).mean(-1) / t.pow(2).mean().clamp(min=1e-12)
    elif kind == "cosine":
        per_pos = 1 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"unknown hidden loss {kind!r}")
    return _mean(per_pos, mask)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1."""
    per_pos = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    return _mean(per_pos.view(input_ids.shape[0], -1), None if mask is None else mask[:, 1:])


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Which teacher layer each student layer's output is matched to: evenly spaced, the last
    student layer to the last teacher layer (student layer i -> teacher round((i+1) * T/S) - 1).
    Equal depths map one to one."""
    if student_layers > teacher_layers:
        raise ValueError(f"student has more layers ({student_layers}) than the teacher ({teacher_layers})")
    ratio = teacher_layers / student_layers
    return [round((i + 1) * ratio) - 1 for i in range(student_layers)]
