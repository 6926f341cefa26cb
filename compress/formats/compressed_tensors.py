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


@torch.no_grad()
def attach(
    model: torch.nn.Module, scheme: Scheme, ignore: list[str], weights: dict[str, QuantizedWeight]
) -> ModelCompressor:
    """Put our integers and scales into the model in compressed form; returns the compressor."""
    config = QuantizationConfig(
        config_groups={"group_0": scheme.ct_scheme(TARGETS)},
        ignore=ignore,
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, config, show_progress=False)
    found = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    if found != set(weights):
        raise RuntimeError(f"compressed-tensors matched {len(found)} layers, we quantized {len(weights)}")
    modules = [(m, weights[n]) for n, m in model.named_modules() if n in weights]
    for module, qw in modules:
        module.weight_scale.data = qw.scale.to(module.weight_scale.device)
        module.weight_zero_point.data = qw.zero_point.to(module.weight_zero_point.device)
    compressor = ModelCompressor.from_pretrained_model(model)
    for module, qw in modules:
        # fp32 weights that sit exactly on the grid: the compressor's own rounding
        # (w / scale) then recovers our integers exactly, whatever the model's dtype.
        # One layer at a time, so only one fp32 copy exists at once.
        exact = dequantize(qw.q, qw.scale.float(), qw.zero_point).to(module.weight.device)
        module.weight = torch.nn.Parameter(exact, requires_grad=False)
        compress_module(module, compressor.force_compression_format)
    compressor.compress_model(model, skip_compressed=True)
    return compressor


def save(model: torch.nn.Module, compressor: ModelCompressor, dest) -> None:
    model.save_pretrained(dest)
    compressor.update_config(str(dest))
