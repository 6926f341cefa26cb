"""Sentence embeddings (mean pooling, as sentence-transformers models use) and their agreement."""

from __future__ import annotations

import torch


def sentences(texts: list[str], limit: int) -> list[str]:
    """Paragraphs of at least 40 characters, as sentence-like inputs."""
    out = [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) >= 40]
    return out[:limit]


@torch.no_grad()
def embed(
    model: torch.nn.Module, tokenizer, texts: list[str], max_len: int = 128, batch_size: int = 32
) -> torch.Tensor:
    device = next(model.parameters()).device
    chunks = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        ).to(device)
        hidden = model(**enc).last_hidden_state.float()  # [B, T, H]
        mask = enc["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
        chunks.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))  # [B, H]
    return torch.cat(chunks)


def cosine(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    sims = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return float(sims.mean()), float(sims.min())
