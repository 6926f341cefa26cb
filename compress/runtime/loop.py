"""One greedy-decoding protocol for every runtime, so their timings compare.

A round: prefill the prompt [B, P] and pick each row's next token (time to first token),
then `new_tokens` single-token steps with the KV cache, each picking the argmax.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Decoder(Protocol):
    runtime: str  # "torch", "onnxruntime", "llama.cpp"
    kernel: str  # what does the matmuls, in words

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """[B, P] int64 -> next tokens [B, 1]; starts a new sequence (drops any cache)."""

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """[B, 1] -> next tokens [B, 1], extending the cache."""


@dataclass(frozen=True)
class Timing:
    ttft_s: float  # prefill + first token
    prefill_tokens_per_s: float  # B * P / ttft
    decode_tokens_per_s: float  # B * new_tokens / time of the steps


def generate(dec: Decoder, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """[B, P] -> the greedy continuation [B, new_tokens]."""
    tok = dec.prefill(prompt)
    out = [tok]
    for _ in range(new_tokens - 1):
        tok = dec.step(tok)
        out.append(tok)
    return np.concatenate(out, axis=1)


def one_round(dec: Decoder, prompt: np.ndarray, new_tokens: int) -> Timing:
    b, p = prompt.shape
    t0 = time.perf_counter()
    tok = dec.prefill(prompt)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        tok = dec.step(tok)
    t2 = time.perf_counter()
    return Timing(t1 - t0, b * p / (t1 - t0), b * new_tokens / (t2 - t1) if new_tokens else float("nan"))


def median(timings: list[Timing]) -> Timing:
    return Timing(
        *(
            statistics.median(getattr(t, f) for t in timings)
            for f in ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s")
        )
    )


def target_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(targets[t]) under logits[t] [T, V], in float64 (for runtimes that hand back numpy)."""
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return logp[np.arange(len(targets)), targets]
