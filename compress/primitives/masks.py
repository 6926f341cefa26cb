"""Which weights to keep: masks from importance scores (True = kept).

Unstructured masks keep a fraction of each comparison group (a row, or the whole
matrix); N:M masks keep the N highest scores of every M consecutive input weights.
"""

from __future__ import annotations

import torch


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N kept, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or N:M such as 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern}: N:M keeps N of every M weights, so 0 < N < M is needed")
    return n, m


def keep_top(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """score [O, I] -> mask keeping the highest (1 - sparsity) of each row (or of the whole)."""
    flat = score.reshape(score.shape[0], -1) if per_row else score.reshape(1, -1)
    drop = int(flat.shape[1] * sparsity)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        idx = torch.topk(flat, drop, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask.reshape(score.shape)


def keep_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """score [O, I] (I divisible by M) -> mask keeping the N highest of each M consecutive inputs."""
    out_f, in_f = score.shape
    if in_f % m:
        raise ValueError(f"{n}:{m} sparsity needs input widths divisible by {m}; a layer has {in_f}")
    groups = score.reshape(out_f, in_f // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool).scatter_(2, idx, False)
    return mask.reshape(out_f, in_f)


def n_of_m_holds(w: torch.Tensor, n: int, m: int) -> bool:
    """Every M consecutive inputs of every row hold at most N non-zeros."""
    out_f, in_f = w.shape
    return bool(((w != 0).reshape(out_f, in_f // m, m).sum(-1) <= n).all())
