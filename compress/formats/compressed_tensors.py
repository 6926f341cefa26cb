"""Write quantized weights in the compressed-tensors format (config.json `quantization_config`).

int4 weights are packed 8 to an int32 ("pack-quantized"), int8 stored as int8
("int-quantized"), float8 as e4m3 ("float-quantized"); transformers and vLLM read them
without our code.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.base import compress_module
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

from compress.models.arch import TARGETS
from compress.primitives.qparams import dequantize
from compress.quant.rtn import QuantizedWeight
from compress.quant.schemes import Scheme


def config_for(scheme: Scheme, ignore: list[str]) -> QuantizationConfig:
    return QuantizationConfig(
        config_groups={"group_0": scheme.ct_scheme(TARGETS)},
        ignore=ignore,
        quantization_status=QuantizationStatus.FROZEN,
    )


@torch.no_grad()
def compress_linears(model: torch.nn.Module, config: QuantizationConfig, weights: dict[str, QuantizedWeight]) -> None:
    """Replace these linears' weights by our integers and scales in compressed form, as soon
    as they are final (a decoder layer at a time), so dense copies do not pile up."""
    modules = {n: model.get_submodule(n) for n in weights}
    apply_quantization_config(model, config, show_progress=False, allowed_modules=list(modules.values()))
    for name, module in modules.items():
        qw = weights[name]
        if getattr(module, "quantization_scheme", None) is None:
            raise RuntimeError(f"compressed-tensors does not target {name}, which we quantized")
        module.weight_scale.data = qw.scale.to(module.weight_scale.device)
        module.weight_zero_point.data = qw.zero_point.to(module.weight_zero_point.device)
        # fp32 weights that sit exactly on the grid: the compressor's own rounding
        # (w / scale) then recovers our integers exactly, whatever the model's dtype.
        exact = dequantize(qw.q, qw.scale.float(), qw.zero_point).to(module.weight.device)
        module.weight = torch.nn.Parameter(exact, requires_grad=False)
        compress_module(module)


def finish(model: torch.nn.Module, quantized: set[str]) -> ModelCompressor:
    """Check every quantized linear went through `compress_linears`; the compressor that writes
    the config."""
    found = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    if found != quantized:
        raise RuntimeError(f"compressed-tensors holds {len(found)} quantized layers, we quantized {len(quantized)}")
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model, skip_compressed=True)
    return compressor
