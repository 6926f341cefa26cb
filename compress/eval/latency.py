"""Prefill and decode speed at batch 1: a plain greedy loop, rounds of the base and the result
interleaved in one process, medians and ranges."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable

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
    if quant_config.get("quant_method") == "bitsandbytes":
        compute = quant_config.get("bnb_4bit_compute_dtype", "?")
        return f"bitsandbytes Linear4bit NF4, {compute} compute (other layers: {name})"
    name += " (transformers decompresses compressed-tensors weights on the first forward"
    groups = quant_config.get("config_groups", {}).values()
    if any(g.get("input_activations") for g in groups):
        name += "; activations fake-quantized per token in Python, no low-bit kernel"
    return name + ")"


# Ratio of the largest to the smallest per-pair ratio above which a speed ratio is not stated as
# fact: a quarter's disagreement between rounds is more than any kernel difference we would claim
# from 5 rounds (benchmarks/report_timing.py shows identical weights quiet, busy, and load starting partway).
NOISY_SPREAD = 1.25

Round = tuple[float, float | None]  # prefill tokens/s, decode tokens/s (None: an encoder)


def interleaved(subjects: list[Callable[[], Round]], rounds: int) -> list[list[Round]]:
    """Run every subject's round `rounds` times, interleaved A B, B A, A B, ... so that whatever
    else the machine does lands on all of them alike; each subject warms up once first."""
    for run in subjects:
        run()
    out: list[list[Round]] = [[] for _ in subjects]
    for i in range(rounds):
        order = range(len(subjects)) if i % 2 == 0 else reversed(range(len(subjects)))
        for k in order:
            out[k].append(subjects[k]())
    return out


def decoder_round(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], Round]:
    """prompt: [1, P]. One greedy round with the protocol `compress bench` uses on every
    runtime (runtime/loop.py): prefill P tokens, then new_tokens single-token steps."""
    dec, ids = TorchDecoder(model, kernel=""), prompt.cpu().numpy()

    def run() -> Round:
        t = loop.one_round(dec, ids, new_tokens)
        return t.prefill_tokens_per_s, t.decode_tokens_per_s

    return run


def encoder_round(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], Round]:
    ids = ids.to(next(model.parameters()).device)

    @torch.no_grad()
    def run() -> Round:
        start = time.perf_counter()
        model(ids)
        return ids.numel() / (time.perf_counter() - start), None

    return run


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def compare(base: list[Round], result: list[Round]) -> dict:
    """Speed of the result over the base from rounds timed interleaved: the ratio of each round's
    pair (adjacent in time, so a busy spell hits both), their median and range; `noisy` when the
    range is too wide for the median to mean anything."""
    out: dict = {"rounds": len(base)}
    for k, name in enumerate(("prefill", "decode")):
        if base[0][k] is None:
            out[name], out[f"{name}_range"] = None, None
            continue
        ratio, lo, hi = spread([r[k] / b[k] for b, r in zip(base, result)])
        out[name], out[f"{name}_range"] = ratio, [lo, hi]
    ranges = [out[f"{n}_range"] for n in ("prefill", "decode") if out[f"{n}_range"]]
    out["noisy"] = any(hi / lo > NOISY_SPREAD for lo, hi in ranges)
    return out
