"""The loop protocol (runtime/loop.py) over a transformers causal LM with its KV cache."""

from __future__ import annotations

import numpy as np
import torch


class TorchDecoder:
    runtime = "torch"

    def __init__(self, model: torch.nn.Module, kernel: str) -> None:
        self.model = model
        self.kernel = kernel
        self.device = next(model.parameters()).device
        self._past = None

    @torch.no_grad()
    def _next(self, ids: torch.Tensor) -> np.ndarray:
        out = self.model(ids, past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        return out.logits[:, -1:].argmax(-1).cpu().numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self._past = None
        return self._next(torch.from_numpy(np.ascontiguousarray(ids)).to(self.device))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self._next(torch.from_numpy(tokens).to(self.device))
