"""The quantization methods, by the name recipes and the CLI use. Adding one: a file in
methods/, one line here, its test."""

from __future__ import annotations

from compress.quant.method import QuantMethod
from compress.quant.methods import awq, awq_signround, gptaq, gptq, hqq, rtn, signround, smoothquant

METHODS: dict[str, type[QuantMethod]] = {
    m.name: m
    for m in (
        rtn.RTN,
        gptq.GPTQ,
        gptaq.GPTAQ,
        awq.AWQ,
        smoothquant.SmoothQuantGPTQ,
        smoothquant.SmoothQuantRTN,
        hqq.HQQ,
        signround.SignRound,
        awq_signround.AWQSignRound,
    )
}
