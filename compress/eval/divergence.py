"""How far a compressed model's next-token distributions moved from its base's, on the
evaluation windows: KL divergence per position and top-1 agreement (llama.cpp's
`perplexity --kl-divergence` protocol). Perplexity averages log-probabilities of the right
token, so errors that raise some and lower others cancel; KL divergence counts every one.

Both models run over the same windows in one process, a batch at a time: the base's full
distributions are never stored (8192 positions x 49152 tokens would be 1.6 GB in float32)."""

from __future__ import annotations

import torch

from compress.primitives.kl import kl_top1
from compress.report.schema import Divergence


@torch.no_grad()
def compare(
    base: torch.nn.Module, model: torch.nn.Module, windows: torch.Tensor, text: str, batch_size: int = 4
) -> Divergence:
    """windows [N, T] of `text` -> the result's divergence from the base over the N x (T-1) predicted positions."""
    device = next(model.parameters()).device
    base_device = next(base.parameters()).device
    kls, agree = [], []
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size]  # [B, T]
        logits = model(x.to(device)).logits[:, :-1]  # [B, T-1, V]
        ref = base(x.to(base_device)).logits[:, :-1].to(device)
        for b in range(len(x)):  # one window at a time: float32 [T, V] copies stay ~100 MB
            kl, same = kl_top1(ref[b], logits[b])
            kls.append(kl.cpu())
            agree.append(same.cpu())
    kl, same = torch.cat(kls).double(), torch.cat(agree)
    return Divergence(
        kl_mean=float(kl.mean()),
        kl_p99=float(torch.quantile(kl, 0.99)),
        kl_max=float(kl.max()),
        top1_agreement=float(same.float().mean()),
        positions=kl.numel(),
        text=text,
    )
