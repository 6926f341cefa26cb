"""The dtype a model computes in, apart from the dtype its weights are stored in.

A CPU without native bfloat16 (no AVX512-BF16 or AMX) multiplies 16-bit matrices through
conversions: on an AVX2 EPYC, bf16 F.linear ran 15 GFLOP/s against float32's 96, which made
every calibration and evaluation pass 6x slower than it needs to be. There the model computes
in float32, which holds every 16-bit value exactly; scales are still computed in the stored
dtype and the checkpoint is written in it (`to_stored`), so the output has the same size and
the same kind of numbers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path

import psutil
import torch

from compress.errors import UsageError, printable

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HALF = (torch.bfloat16, torch.float16)
SLOWER = 2.0  # 16-bit matmuls this many times slower than float32 compute in float32 (6x on AVX2; <1x with AMX)
FASTER = 1.3  # 16-bit matmuls this many times float32's speed are worth their rounding (2.0-2.2x with AVX512-BF16)
MEMORY_SHARE = 0.4  # float32 weights may take this share of the available memory, else compute as stored
# "stored" or "float32": compute so on any CPU (to measure the difference, or for the same results on every machine)
OVERRIDE = "COMPRESS_COMPUTE_DTYPE"


@functools.cache
def half_speed(dtype: torch.dtype) -> float:
    """float32's time over `dtype`'s for one [256, 1024] x [1024, 1024] product on the CPU (best of 5
    each): above 1, `dtype` multiplies faster (2.0-2.2 for bfloat16 on an AVX512-BF16 EPYC, 1/6 on AVX2)."""

    def best(dt: torch.dtype) -> float:
        x, w = torch.randn(256, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
        torch.nn.functional.linear(x, w)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.float32) / best(dtype)


def half_is_slow(dtype: torch.dtype) -> bool:
    return half_speed(dtype) < 1 / SLOWER


def half_is_fast(dtype: torch.dtype, device: str) -> bool:
    """`dtype` matmuls at least `FASTER` times float32's speed on `device` (a CUDA GPU whose tensor cores have the
    dtype: bfloat16 emulated on a pre-Ampere GPU is not)."""
    if device.startswith("cuda"):
        return dtype == torch.float16 or torch.cuda.is_bf16_supported(including_emulation=False)
    return device == "cpu" and half_speed(dtype) >= FASTER


def compute_dtype(stored: torch.dtype, device: str, float32_bytes: int) -> torch.dtype:
    """float32 for 16-bit weights on a CPU where 16-bit matmuls are slow and float32 weights fit
    (`float32_bytes`) in `MEMORY_SHARE` of the available memory; else the stored dtype.
    `COMPRESS_COMPUTE_DTYPE` (`OVERRIDE`) set to "stored" or "float32" decides on a CPU instead."""
    override = os.environ.get(OVERRIDE)
    if override not in (None, "", "stored", "float32"):
        raise UsageError(f'{OVERRIDE}="{printable(override, newlines=False)}": expected "stored" or "float32"')
    if stored not in HALF or device != "cpu" or override == "stored":
        return stored
    if override == "float32":
        return torch.float32
    if float32_bytes > MEMORY_SHARE * psutil.virtual_memory().available:
        return stored
    return torch.float32 if half_is_slow(stored) else stored


def stored_dtype(config: dict | object) -> torch.dtype:
    """The dtype a checkpoint's config names, as config.json's dict or a transformers config
    (`dtype`, or the older `torch_dtype`; float32 when it names none)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    named = get("dtype") or get("torch_dtype")
    return named if isinstance(named, torch.dtype) else DTYPES.get(named, torch.float32)


def float32_bytes(ckpt: Path, quantization_config: dict | None) -> int:
    """An upper bound of a checkpoint's weights in float32: its safetensors files, every byte
    taken to hold weights of the fewest bits it stores (16, or its quantization config's)."""
    groups = (quantization_config or {}).get("config_groups") or {}
    bits = min([16, *((g.get("weights") or {}).get("num_bits", 16) for g in groups.values())])
    return 32 // bits * sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors"))


def kept_in_float32(model: torch.nn.Module) -> set[str]:
    """Names of the modules the architecture keeps in float32 whatever the model's dtype."""
    return set(getattr(model, "_keep_in_fp32_modules", None) or ())


@torch.no_grad()
def to_stored(model: torch.nn.Module, stored: torch.dtype, keep: set[str] | None = None) -> list[torch.Tensor]:
    """Round the float32 tensors of a model computed in float32 to the stored dtype, in place
    (before it is saved); modules the architecture keeps in float32 (`keep`, by default
    `kept_in_float32(model)`) stay so. Returns the tensors it rounded."""
    if stored == torch.float32:
        return []
    keep = kept_in_float32(model) if keep is None else keep
    cast = []
    for mod_name, module in model.named_modules():
        if keep & set(mod_name.split(".")):
            continue
        saved = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, t in saved:
            if t.dtype == torch.float32 and name not in module._non_persistent_buffers_set:
                t.data = t.data.to(stored)
                cast.append(t)
    return cast


@contextlib.contextmanager
def saved_as(model: torch.nn.Module, stored: torch.dtype):
    """The model in its stored dtype while it is saved, in float32 again after (its values
    rounded as saved, so a run resumed from the save computes on what this one goes on with)."""
    cast = to_stored(model, stored)
    try:
        yield
    finally:
        with torch.no_grad():
            for t in cast:
                t.data = t.data.float()
