"""GPTAQ (Li et al., 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration", arXiv
2504.02692; GPTQModel's `v2`): GPTQ whose target is each linear's output in the unchanged model, W x_float, rather
than its output on the inputs the already quantized layers produce, W x. The engine carries the unchanged model's
hidden states beside the quantized ones and collects, per linear, the drift 2/n sum (x_float - x) x^T next to the
Hessian; as GPTQ fixes each column, that column's share of the drift goes to the columns not yet quantized
(`primitives.gptq`, `drift`)."""

from __future__ import annotations

import torch
from pydantic import Field

from compress.calibrate import Gather, InputStats
from compress.primitives.gptq import gptq
from compress.quant.method import Quantized
from compress.quant.methods.gptq import GPTQ, GPTQOptions


class GPTAQOptions(GPTQOptions):
    gptaq_alpha: float = Field(
        0.25, ge=0, le=1, description="GPTAQ: weight of the input-drift correction (the paper's default, 0.25)"
    )


class GPTAQ(GPTQ):
    name = "gptaq"
    Options = GPTAQOptions
    working_memory = 1.2  # a second [I, I] matrix per input and the float stream's hidden states
    time_factor = 1.4  # each layer also runs on the float stream, with its linears' inputs captured
    float_stream = True

    def gather(self, model, layer, targets) -> Gather:
        return Gather(hessian=True, drift=True)

    def quantize(self, w: torch.Tensor, stats: InputStats | None) -> Quantized:
        o, t = self.options, self.target
        keep = w != 0 if t.keep_zeros else None
        return gptq(
            w,
            stats.hessian.H,
            t.grid,
            t.scale_dtype(w),
            o.block_size,
            o.dampening,
            o.actorder,
            t.range_search,
            keep,
            drift=stats.drift,
            drift_weight=o.gptaq_alpha,
        )
