"""Prefill and decode speed at batch 1: medians of several rounds of a plain greedy loop."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from compress.formats import sparse
from compress.runtime import loop
from compress.runtime.torch_decoder import TorchDecoder
from compress.runtime.torch_kernels import use_sparse24


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


def with_sparse24(model: torch.nn.Module, checkpoint: Path, kernel: str) -> str:
    """An unquantized 2:4 pruned checkpoint: on CUDA, give its linears torch's semi-structured
    sparse weights (in place) and name that kernel; on CPU, say the pattern buys nothing."""
    if (sparse.info(checkpoint) or {}).get("pattern") != "2:4":
        return kernel
    if next(model.parameters()).device.type == "cuda":
        return use_sparse24(model)
    return kernel + " (2:4 sparsity unused: torch's semi-structured sparse kernels run on CUDA only)"


def kernel_name(model: torch.nn.Module, quant_config: dict | None) -> str:
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    name = f"torch dense {dtype} matmul"
    if not quant_config:
        return name
    name += " (transformers decompresses compressed-tensors weights on the first forward"
    groups = quant_config.get("config_groups", {}).values()
    if any(g.get("input_activations") for g in groups):
        name += "; activations fake-quantized per token in Python, no low-bit kernel"
    return name + ")"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def causal_lm(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, rounds: int = 3) -> dict[str, float]:
    """prompt: [1, P]. Tokens/s for prefill (P tokens) and decode (new_tokens steps), with the
    greedy protocol `compress bench` uses on every runtime (runtime/loop.py)."""
    dec = TorchDecoder(model, kernel="")
    ids = prompt.cpu().numpy()
    loop.one_round(dec, ids, min(new_tokens, 8))  # warm-up
    t = loop.median([loop.one_round(dec, ids, new_tokens) for _ in range(rounds)])
    return {"prefill_tokens_per_s": t.prefill_tokens_per_s, "decode_tokens_per_s": t.decode_tokens_per_s}


@torch.no_grad()
def encoder(model: torch.nn.Module, ids: torch.Tensor, rounds: int = 3) -> dict[str, float]:
    ids = ids.to(next(model.parameters()).device)
    model(ids)
    t = statistics.median(_timed(lambda: model(ids)) for _ in range(rounds))
    return {"prefill_tokens_per_s": ids.numel() / t, "decode_tokens_per_s": None}
