"""Write NF4 weights in bitsandbytes' serialized 4-bit format, which transformers loads through bitsandbytes
(`quantization_config.quant_method: bitsandbytes`, `load_in_4bit`), e.g. as the frozen base of QLoRA.

Per quantized linear [O, I], as transformers' own `save_pretrained` writes a bitsandbytes model:
  weight                                      uint8 [O*I/2, 1]  two codes a byte, the first in the high nibble
  weight.absmax                               float32 [O*I/b]   one scale a block of b consecutive weights
  weight.quant_map                            float32 [16]      the NF4 code
  weight.quant_state.bitsandbytes__nf4        uint8 [n]         JSON: quant_type, blocksize, dtype, shape
Blocks run along the flattened row-major weight; with b dividing I they are our groups of b columns of one row.
We write the tensors ourselves: our codes and scales are chosen by GPTQ, not by bitsandbytes' rounding, and
(measured) a forward pass through bitsandbytes' Linear4bit on a CPU with AVX512-BF16 repacks absmax, so a model
saved after one reloads as garbage. Double quantization (absmax stored at 8 bits) is not written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.primitives.qparams import NF4, QuantizedWeight

# the tensors beside each linear's packed `weight`, by the names bitsandbytes gives them
ABSMAX, QUANT_MAP, QUANT_STATE = "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"


def pack(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [O, I] (0..15) -> [O*I/2, 1] uint8, element 2k in the high nibble of byte k."""
    flat = q.reshape(-1).to(torch.uint8)
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


def unpack(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of `pack`: uint8 codes of `shape`."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(shape)


class NF4Linear(torch.nn.Module):
    """A linear layer after quantization, holding what bitsandbytes stores, only to be saved: its layer is final
    (the engine has moved past it), so it has no forward. Its tensors are plain attributes, not buffers, so that
    casting the model to its stored dtype before saving leaves the float32 absmax alone; the state dict names them
    as bitsandbytes does."""

    def __init__(self, lin: torch.nn.Linear, qw: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.blocksize = lin.in_features // qw.scale.shape[1]
        self.dtype = dtype
        self.packed = pack(qw.q)
        self.absmax = qw.scale.float().reshape(-1).contiguous()
        self.bias = lin.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        meta = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": [self.out_features, self.in_features],
        }
        destination[prefix + "weight"] = self.packed
        destination[prefix + ABSMAX] = self.absmax
        destination[prefix + QUANT_MAP] = NF4.clone()  # one per linear: safetensors refuses shared storage
        destination[prefix + QUANT_STATE] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def compress_linears(model: torch.nn.Module, weights: dict[str, QuantizedWeight], dtype: torch.dtype) -> None:
    """Replace these linears by their NF4 storage as soon as they are final (a decoder layer at a time)."""
    for name, qw in weights.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, NF4Linear(getattr(owner, child), qw, dtype))


class Writer:
    """What the quantize stage hands on for the checkpoint's `quantization_config` (the counterpart of
    compressed-tensors' ModelCompressor)."""

    def __init__(self, model: torch.nn.Module, quantized: set[str], dtype: torch.dtype):
        found = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
        if found != quantized:
            raise RuntimeError(f"{len(found)} linears hold NF4 weights, we quantized {len(quantized)}")
        self.dense = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        self.dtype = dtype

    def config(self) -> dict:
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": False,
            "bnb_4bit_compute_dtype": str(self.dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            # every linear left dense, by full name: bitsandbytes would otherwise quantize them on load
            "llm_int8_skip_modules": self.dense,
        }

    def write_config(self, dest: Path) -> None:
        path = Path(dest) / "config.json"
        config = json.loads(path.read_text())
        config["quantization_config"] = self.config()
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
