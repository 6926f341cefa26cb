"""Running input statistics of a linear layer: H = 2/n * sum x x^T (GPTQ, SparseGPT)."""

from __future__ import annotations

import torch


class Hessian:
    """Accumulates sum x x^T in float32; `H` scales it by 2/n on demand.

    Products are taken in float32 (a bfloat16 layer's inputs convert exactly). Multiplying in
    bfloat16 is about 4x faster on CPU but rounds each batch's [I, I] product to 8 bits of
    mantissa; measured on SmolLM2-135M that cost GPTQ w4a16 perplexity 16.75 against 16.39
    and SparseGPT 2:4 32.24 against 31.85, for 20% of the stage's time.
    Wide inputs are split in column blocks so the symmetric half is computed once.
    """

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)  # [I, I]
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """x: [..., I] inputs of the layer."""
        x = x.reshape(-1, x.shape[-1]).float()  # [n, I]
        # x^T x is symmetric: compute the blocks on and above the diagonal only.
        k = 1 if x.shape[1] < 512 else 2 if x.shape[1] < 1024 else 3
        bounds = [x.shape[1] * i // k for i in range(k + 1)]
        for i in range(k):
            for j in range(i, k):
                rows, cols = slice(bounds[i], bounds[i + 1]), slice(bounds[j], bounds[j + 1])
                block = x[:, rows].T @ x[:, cols]
                self.sum[rows, cols] += block
                if i != j:
                    self.sum[cols, rows] += block.T
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.n, 1))

    def rescale(self, s: torch.Tensor) -> None:
        """The inputs became x / s (a smoothing fold)."""
        self.sum /= s[:, None] * s[None, :]
