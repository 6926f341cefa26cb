"""Text -> fixed-length token windows, shared by calibration and perplexity."""

from __future__ import annotations

import torch


def windows(tokenizer, texts: list[str], seq_len: int, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` tokens of the texts joined by blank lines, as [N, seq_len]
    (N may be 0 when the text is shorter than one window)."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(len(ids), max_tokens) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)
