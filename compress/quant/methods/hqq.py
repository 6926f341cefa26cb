"""HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization"): fit each group's grid to its
weights under an l_p loss (p < 1) instead of the squared error, so a few outlier weights do
not set the grid for the whole group. No data.

Half-quadratic splitting alternates two closed-form steps per group: the outliers
E = shrink_p(W - W_hat) (a generalised soft threshold), then the grid parameters that best fit
W - E in least squares: the zero point (asymmetric grids, kept an integer as compressed-tensors
stores it) and the scale. Each group keeps the iterate with the least l_p error, starting from
the range-searched RTN grid, so it never fits worse than RTN on that loss.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.calibrate import InputStats
from compress.primitives.qparams import grouped, quantize, search_range
from compress.quant.method import Quantized, QuantMethod, round_weights

P = 0.7  # the l_p norm HQQ's reference implementation uses
BETA, KAPPA = 10.0, 1.01  # the penalty's start and growth per iteration (the reference's defaults)


class HQQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hqq_iters: int = Field(20, ge=1, le=1000, description="HQQ: half-quadratic iterations per group")


def shrink(x: torch.Tensor, beta: float, p: float = P) -> torch.Tensor:
    """The proximal step of |x|^p: soft threshold with a magnitude-dependent width."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-12).pow(p - 1) / beta)


def lp_error(wg: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[O, G] sum |w - (q - z) s|^p per group."""
    return (wg - (q - z[..., None]) * s[..., None]).abs().pow(P).sum(-1)


@torch.no_grad()
def hqq(w: torch.Tensor, grid, scale_dtype: torch.dtype, iters: int) -> Quantized:
    """w [O, I] -> integers, scale [O, G] (scale_dtype), zero point [O, G] on an int grid."""
    scale, zp = search_range(w, grid, scale_dtype)
    wg = grouped(w.float(), w.shape[1] // scale.shape[1])  # [O, G, g]
    s, z = scale.float(), zp.float()

    def rounded(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ((wg / s[..., None]).round() + z[..., None]).clamp(grid.qmin, grid.qmax)

    q = rounded(s, z)
    best_s, best_z, best_err = s, z, lp_error(wg, q, s, z)
    beta = BETA
    for _ in range(iters):
        target = wg - shrink(wg - (q - z[..., None]) * s[..., None], beta)  # the weights without their outliers
        if not grid.symmetric:
            z = (q - target / s[..., None]).mean(-1).round().clamp(grid.qmin, grid.qmax)
        c = q - z[..., None]
        fit = (target * c).sum(-1) / (c * c).sum(-1).clamp(min=1e-12)
        s = torch.where(fit * s > 0, fit, s).to(scale_dtype).float()  # as stored; a symmetric scale keeps its sign
        q = rounded(s, z)
        err = lp_error(wg, q, s, z)
        better = err < best_err
        best_s, best_z, best_err = (
            torch.where(better, s, best_s),
            torch.where(better, z, best_z),
            torch.minimum(err, best_err),
        )
        beta *= KAPPA
    scale, zp = best_s.to(scale_dtype), best_z.to(torch.int8)
    return quantize(w, scale, zp, grid), scale, zp


class HQQ(QuantMethod):
    name = "hqq"
    Options = HQQOptions
    calibrated = False
    working_memory = 0.25

    def quantize(self, w: torch.Tensor, stats: InputStats | None) -> Quantized:
        if self.target.grid.kind != "int":
            return round_weights(w, self.target)  # fp8 has no integer grid to fit: round to nearest
        return hqq(w, self.target.grid, self.target.scale_dtype(w), self.options.hqq_iters)
