"""Write quantized weights in the compressed-tensors format (config.json `quantization_config`).

int4 weights are packed 8 to an int32 ("pack-quantized"), int8 stored as int8
("int-quantized"), float8 as e4m3 ("float-quantized"); transformers and vLLM read them
without our code.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config

from compress.models.arch import TARGETS
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
    for name, module in model.named_modules():
        qw = weights.get(name)
        if qw is None:
            continue
        module.weight_scale.data = qw.scale.to(module.weight_scale.device)
        module.weight_zero_point.data = qw.zero_point.to(module.weight_zero_point.device)
        # fp32 weights that sit exactly on the grid: the compressor's own rounding
        # (w / scale) then recovers our integers exactly, whatever the model's dtype.
        exact = (qw.q.float() - qw.zero_point.float().repeat_interleave(qw.q.shape[1] // qw.scale.shape[1], 1))
        exact = exact * qw.scale.float().repeat_interleave(qw.q.shape[1] // qw.scale.shape[1], 1)
        module.weight = torch.nn.Parameter(exact, requires_grad=False)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    return compressor


def save(model: torch.nn.Module, compressor: ModelCompressor, dest) -> None:
    model.save_pretrained(dest)
    compressor.update_config(str(dest))
