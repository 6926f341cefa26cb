"""Running input statistics of a linear layer: H = 2/n * sum x x^T (GPTQ, SparseGPT)."""

from __future__ import annotations

import torch


class Hessian:
    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(features, features, dtype=torch.float32, device=device)  # [I, I]
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """x: [..., I] inputs of the layer."""
        x = x.reshape(-1, x.shape[-1]).float()  # [n, I]
        n = x.shape[0]
        self.H *= self.n / (self.n + n)
        self.n += n
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x
