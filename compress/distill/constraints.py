"""What training must preserve in a compressed student.

- `SparsityMasks`: a pruned student's zeros stay exact zeros (re-applied after every step).
- `FakeQuant`: a quantized student trains through its quantized weights. Each linear keeps a
  float "latent" weight; the forward pass sees it rounded onto the checkpoint's own grid
  (its scales and zero points, kept fixed) and the gradient passes straight through the
  rounding. At step 0 the rounded weight is exactly the checkpoint's, and saving rounds
  the latent weight onto the same grid again.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from compress.primitives.qparams import GridParams, dequantize, quantize


class SparsityMasks:
    def __init__(self, linears: dict[str, torch.nn.Linear]):
        self.masks = {name: lin.weight.detach() != 0 for name, lin in linears.items()}  # [O, I] bool
        self.linears = linears

    @torch.no_grad()
    def apply(self) -> None:
        for name, lin in self.linears.items():
            # A fake-quantized linear's own tensor is its latent weight (zero stays zero on the grid).
            w = lin.parametrizations.weight.original if parametrize.is_parametrized(lin, "weight") else lin.weight
            w.mul_(self.masks[name].to(w.device))

    def zeros(self) -> int:
        return sum(int((~m).sum()) for m in self.masks.values())


class _RoundOnGrid(torch.nn.Module):
    """weight -> its rounded value, with the straight-through gradient (identity)."""

    def __init__(self, params: GridParams):
        super().__init__()
        self.grid = params.grid
        self.register_buffer("scale", params.scale.float(), persistent=False)
        self.register_buffer("zero_point", params.zero_point, persistent=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rounded = dequantize(quantize(w, self.scale, self.zero_point, self.grid), self.scale, self.zero_point).to(
                w.dtype
            )
        return w + (rounded - w).detach()


class FakeQuant:
    def __init__(self, linears: dict[str, torch.nn.Linear], params: dict[str, GridParams]):
        self.linears, self.params = linears, params
        for name, lin in linears.items():
            parametrize.register_parametrization(lin, "weight", _RoundOnGrid(params[name]))

    def latent(self, name: str) -> torch.Tensor:
        return self.linears[name].parametrizations.weight.original

    def remove(self) -> dict[str, tuple[torch.Tensor, GridParams]]:
        """Undo the parametrization; each linear's integers on its grid, from the latent weight."""
        out = {}
        for name, lin in self.linears.items():
            p = self.params[name]
            q = quantize(self.latent(name).detach(), p.scale.float(), p.zero_point, p.grid)
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
            out[name] = (q, p)
        return out
