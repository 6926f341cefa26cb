"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights with per-channel
scales s_j = max|x_j|^a / max|w_j|^(1-a) folded from each norm into the linears it feeds, so
int8/fp8 activations lose less; then the weights are quantized by GPTQ or round to nearest.
The strength `alpha` is searched per smoothing group for the least quantized output error."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.calibrate import Gather, InputStats, Layer
from compress.models.arch import smooth_maps
from compress.primitives.qparams import Grid, fake_quantize, fake_quantize_tokens
from compress.primitives.smoothing import Tie, smoothquant_scales, untied
from compress.quant.method import Quantized, QuantMethod, round_weights, smooth
from compress.quant.methods.gptq import GPTQ, GPTQOptions

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SEARCH_ROWS = 2048  # input rows per smoothing group kept for the alpha search
CHUNK_ROWS = 256  # calibration rows per chunk of the alpha search


class SmoothQuantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float | None = Field(
        None, ge=0, le=1, description="SmoothQuant: migration strength 0..1 (default: searched per layer)"
    )


class SmoothQuantGPTQOptions(GPTQOptions, SmoothQuantOptions):
    pass


def searched_scale(
    x: torch.Tensor, weights: list[torch.Tensor], grid: Grid, act: str | None, tie: Tie = untied
) -> torch.Tensor:
    """SmoothQuant scales for the alpha (or none) whose quantized weights and activations
    best reproduce the float outputs on the calibration rows x [N, I]; `tie`: the channels that
    share a scale."""
    absmax = x.abs().amax(0)
    w = torch.cat([t.float() for t in weights])  # [sum O, I]
    chunks = x.split(CHUNK_ROWS)
    # The float outputs are the same for every alpha (smoothing is exact in float): computed once, they
    # halve its matrix work (SmolLM2 w8a8, 8 samples: the search 47 -> 30 s) for N x O floats held (25 MB there).
    refs = [xc @ w.T for xc in chunks]  # [chunk, sum O]

    def loss(s: torch.Tensor) -> float:
        wq = fake_quantize(w * s, grid).T
        sse = sum(float((ref - fake_quantize_tokens(xc / s, act) @ wq).pow(2).sum()) for xc, ref in zip(chunks, refs))
        return sse / (x.shape[0] * w.shape[0])

    best, best_loss = torch.ones(w.shape[1]), loss(torch.ones(w.shape[1]))
    for a in ALPHAS:
        s = smoothquant_scales(absmax, weights, a, tie)
        if (err := loss(s)) < best_loss:
            best, best_loss = s, err
    return best


class _Smoothing:
    """The smoothing half, shared by both variants (before the weights are quantized)."""

    working_memory = 1.3
    time_factor = 1.6  # the alpha search

    def gather(self, model, layer, targets) -> Gather:
        rows = {} if self.options.alpha is not None else {m.linears[0]: SEARCH_ROWS for m in smooth_maps(model, layer)}
        return Gather(hessian=self.uses_hessian, absolute=True, rows=rows)

    def prepare(self, model: torch.nn.Module, layer: Layer) -> None:
        alpha, grid, act = self.options.alpha, self.target.grid, self.target.act

        def scale(m, lins):
            st, weights = layer.stats[m.linears[0]], [lin.weight.cpu() for lin in lins]
            if alpha is None:
                return searched_scale(torch.cat(st.samples), weights, grid, act, m.tie)
            return smoothquant_scales(st.absmax.cpu(), weights, alpha, m.tie)

        smooth(model, layer, scale, self.target.dtype)


class SmoothQuantGPTQ(_Smoothing, GPTQ):
    name = "smoothquant+gptq"
    Options = SmoothQuantGPTQOptions
    working_memory = 1.25
    uses_hessian = True


class SmoothQuantRTN(_Smoothing, QuantMethod):
    name = "smoothquant+rtn"
    Options = SmoothQuantOptions
    uses_hessian = False

    def quantize(self, w: torch.Tensor, stats: InputStats | None) -> Quantized:
        return round_weights(w, self.target, importance=stats.mean_square())
