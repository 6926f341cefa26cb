"""GPTQ (Frantar et al., 2022): quantize a linear column by column, each column's rounding
error spread over the columns not yet quantized through the inverse Hessian of its inputs."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.calibrate import Gather, InputStats
from compress.primitives.gptq import gptq
from compress.quant.method import Quantized, QuantMethod


class GPTQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dampening: float = Field(0.01, gt=0, le=1, description="GPTQ: dampening, a fraction of the Hessian's mean diagonal")
    block_size: int = Field(128, ge=1, description="GPTQ: columns per lazy update")
    actorder: bool = Field(False, description="GPTQ: quantize columns by decreasing activation energy")


class GPTQ(QuantMethod):
    name = "gptq"
    Options = GPTQOptions
    working_memory = 1.0
    # Two threads overlap one group's Python-bound column loop with another's matrix work. On 2 cores it
    # only breaks even (SmolLM2 w4a16, 8 samples: 77.5 s against 77.9 s in one thread): pool threads' torch
    # ops run ~2x slower there (see calibrate.calibrate_linears).
    threads = 2

    def gather(self, model, layer, targets) -> Gather:
        return Gather(hessian=True)

    def quantize(self, w: torch.Tensor, stats: InputStats | None) -> Quantized:
        o, t = self.options, self.target
        keep = w != 0 if t.keep_zeros else None  # a pruned model: GPTQ would refill its zeros
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
            **self.correction(stats),
        )

    def correction(self, stats: InputStats) -> dict:
        """Further arguments of `primitives.gptq.gptq` (a variant's correction; GPTQ has none)."""
        return {}
