"""Moving per-channel scale between a layer's input and the op that produces it.

Both AWQ and SmoothQuant pick s [I] and rewrite  prev -> x -> W  as  prev/s -> x/s -> W*s,
which leaves the float model's outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# [I] per-channel statistics, "mean" | "amax" -> [I] with the channels that must share one scale set to their mean
# or maximum (`arch.Smooth.tie`: grouped-query attention's value -> output); `untied` leaves them alone
Tie = Callable[[torch.Tensor, str], torch.Tensor]


def untied(t: torch.Tensor, reduce: str) -> torch.Tensor:
    return t


@torch.no_grad()
def fold(
    prev: torch.nn.Module,
    linears: list[torch.nn.Linear],
    s: torch.Tensor,
    dtype: torch.dtype | None = None,
    prev_s: torch.Tensor | None = None,
    offset: float = 0.0,
) -> None:
    """Divide prev's output channels by prev_s (default: s) and multiply the linears' input columns
    by s (grouped-query attention: a value channel's scale repeats over its query heads); the results
    are rounded to `dtype` (the stored one, when the model computes in float32) and kept in each
    tensor's own dtype. `offset`: a norm that scales by (offset + weight), as Gemma's (1 + weight)."""
    s = s.float()
    ps = s if prev_s is None else prev_s.float()

    def put(t: torch.Tensor, value: torch.Tensor) -> None:
        t.data = value.to(dtype or t.dtype).to(t.dtype)

    if isinstance(prev, torch.nn.Linear):
        put(prev.weight, prev.weight.float() / ps[:, None])
    else:  # a norm: y = (offset + weight) * normalized (+ bias)
        put(prev.weight, (prev.weight.float() + offset) / ps - offset)
    if getattr(prev, "bias", None) is not None:
        put(prev.bias, prev.bias.float() / ps)
    for lin in linears:
        put(lin.weight, lin.weight.float() * s[None, :])


def smoothquant_scales(
    x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float, tie: Tie = untied
) -> torch.Tensor:
    """SmoothQuant (Xiao et al., 2022): s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha), both maxima
    taken over the channels one scale serves (`tie`)."""
    x_absmax = tie(x_absmax, "amax")
    w_absmax = tie(torch.cat([w.float().abs() for w in weights]).amax(0), "amax")  # [I]
    s = x_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def awq_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """AWQ (Lin et al., 2023) scale candidates s = x_mean^r / w_mean^(1-r), r in [0, 1),
    normalized so that max(s) * min(s) = 1."""
    out = []
    for r in torch.arange(steps).float() / steps:
        s = x_mean.clamp(min=1e-4).pow(r) / w_mean.clamp(min=1e-4).pow(1 - r)
        s = s.clamp(min=1e-4)
        out.append(s / (s.max() * s.min()).sqrt())
    return out


def normalized_weight_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Mean over rows of |W| relative to its group's max, per input channel [I]."""
    w = torch.cat([x.float() for x in weights])  # [sum O, I]
    g = group_size or w.shape[1]
    wg = w.abs().reshape(w.shape[0], -1, g)
    return (wg / wg.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(w.shape).mean(0)
