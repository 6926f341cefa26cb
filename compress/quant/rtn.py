"""Round-to-nearest: each weight goes to the nearest point of its min/max grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.primitives.qparams import Grid, compute_qparams, quantize, search_range


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # [O, I] int8 integers or float8 values
    scale: torch.Tensor  # [O, G]
    zero_point: torch.Tensor  # [O, G] int8


@torch.no_grad()
def quantize_weight(w: torch.Tensor, grid: Grid, scale_dtype: torch.dtype, range_search: bool = True) -> QuantizedWeight:
    """range_search: pick each group's range to minimize the weight's squared error
    instead of taking its min/max (still round-to-nearest on the chosen grid)."""
    scale, zp = (search_range if range_search else compute_qparams)(w, grid, scale_dtype)
    return QuantizedWeight(quantize(w, scale, zp, grid), scale, zp)

