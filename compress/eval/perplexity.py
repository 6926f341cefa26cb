"""Perplexity over fixed, non-overlapping windows: each window is scored on its own."""

from __future__ import annotations

import math

import torch

from compress.data.tokens import windows
from compress.errors import UsageError


def token_windows(
    tokenizer, texts: list[str], seq_len: int, max_tokens: int, positions: int | None = None
) -> torch.Tensor:
    """[N, L] windows; L is seq_len, or max_tokens when fewer tokens than one window are asked, or the
    model's `positions` when it attends over fewer (a longer window indexes past its position embeddings)."""
    seq_len = min(seq_len, max_tokens, positions or seq_len)
    out = windows(tokenizer, texts, seq_len, max_tokens)
    if len(out) == 0:
        raise UsageError(f"evaluation text is shorter than one window of {seq_len} tokens")
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size].to(device)  # [B, T]
        logits = model(x).logits[:, :-1].float()  # [B, T-1, V]
        target = x[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
        nll += float(loss)
        count += target.numel()
    return math.exp(nll / count)
