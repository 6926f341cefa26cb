"""The loop protocol (runtime/loop.py) over llama.cpp's Python binding, when installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import UsageError
from compress.runtime import loop


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppDecoder:
    runtime = "llama.cpp"

    def __init__(self, gguf: Path, threads: int, n_ctx: int = 2048, logits_all: bool = False) -> None:
        if not available():
            raise UsageError("--runtime llama.cpp needs llama.cpp's Python binding: pip install llama-cpp-python")
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=logits_all,
            verbose=False,
        )
        self.kernel = f"llama.cpp {llama_cpp.__version__} CPU ({gguf.name})"

    def _next(self, tokens: list[int]) -> np.ndarray:
        self.llm.eval(tokens)
        return np.array([[int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))]], dtype=np.int64)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        if ids.shape[0] != 1:
            raise UsageError("the llama.cpp runtime measures batch 1 only")
        self.llm.reset()
        return self._next(ids[0].tolist())

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self._next([int(tokens[0, 0])])

    def close(self) -> None:
        self.llm.close()

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """Log-probabilities [len(ids) - 1] of each next token (needs logits_all=True)."""
        self.llm.reset()
        self.llm.eval(ids)
        return loop.target_logprobs(np.asarray(self.llm.scores[: len(ids) - 1]), np.asarray(ids[1:]))
