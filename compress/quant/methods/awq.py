"""AWQ (Lin et al., 2023): per-channel scales folded from each norm into the linears it feeds,
chosen for the least output error of the rounded weights, then round to nearest with each
group's range searched for the least input-weighted error."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.calibrate import Gather, InputStats, Layer
from compress.primitives.qparams import Grid, fake_quantize
from compress.primitives.smoothing import Tie, awq_candidates, normalized_weight_mean, untied
from compress.quant.method import Quantized, QuantMethod, round_weights, smooth


class AWQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    awq_grid: int = Field(20, ge=1, description="AWQ: scale candidates to search")


def awq_scale(
    second_moment: torch.Tensor,
    x_mean: torch.Tensor,
    weights: list[torch.Tensor],
    grid: Grid,
    steps: int,
    tie: Tie = untied,
) -> torch.Tensor:
    """The candidate scale whose RTN-quantized linears best reproduce their float outputs.

    The output error of a weight error D [O, I] over all calibration inputs is
    E||x D^T||^2 = sum((D @ M) * D) with M = E[x x^T] [I, I]: every token counts, and no
    [tokens, O] output is ever built.
    """
    w = torch.cat([t.float() for t in weights])  # [sum O, I]
    m = second_moment.float()

    def loss(wq: torch.Tensor) -> float:
        d = w - wq
        return float(((d @ m) * d).sum()) / w.shape[0]

    best, best_loss = torch.ones(w.shape[1]), loss(fake_quantize(w, grid))
    w_mean = tie(normalized_weight_mean(weights, grid.group_size), "mean")
    for s in awq_candidates(tie(x_mean, "mean"), w_mean, steps):  # tied statistics make tied candidates
        if (err := loss(fake_quantize(w * s, grid) / s)) < best_loss:
            best, best_loss = s, err
    return best


class AWQ(QuantMethod):
    name = "awq"
    Options = AWQOptions
    working_memory = 1.15
    time_factor = 1.6  # the scale search

    def gather(self, model, layer, targets) -> Gather:
        return Gather(hessian=True, absolute=True)

    def prepare(self, model: torch.nn.Module, layer: Layer) -> None:
        def scale(m, lins):
            st = layer.stats[m.linears[0]]
            weights = [lin.weight.cpu() for lin in lins]
            return awq_scale(
                st.hessian.H.cpu() / 2,
                st.mean_abs().cpu(),
                weights,
                self.target.grid_of(lins),
                self.options.awq_grid,
                m.tie,
            )

        smooth(model, layer, scale, self.target.dtype)

    def quantize(self, w: torch.Tensor, stats: InputStats | None) -> Quantized:
        return round_weights(w, self.target, importance=stats.mean_square())
