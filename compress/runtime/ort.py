"""A lean decoder loop over an ONNX Runtime session: the KV cache stays in numpy arrays that
go straight back in as the next step's inputs, with no framework in between."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from compress.runtime import loop


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Idle worker threads sleep instead of spinning, so they do not steal the cores from
    # whatever runs next (another model measured in the same process, the Python loop).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtDecoder:
    """An exported decoder (see export/onnx_decoder.py). `forward` is stateless; `prefill` and
    `step` (the loop protocol) keep the cache between calls, in place.

    The loop keeps one preallocated buffer per past tensor and binds it as both the input `past_key_values.*` and
    the output `present.*`: GroupQueryAttention then writes each new position into it instead of returning a copy
    of the whole cache every step (SmolLM2 w4a16, 2 threads, decode after a 512-token prompt, one process,
    alternating: 130 tokens/s against 101, the same greedy tokens)."""

    runtime = "onnxruntime"
    GROW = 256  # positions added to the buffers when they fill up

    def __init__(self, sess, kernel: str = "onnxruntime CPU") -> None:
        self.sess = sess
        self.kernel = kernel
        self.past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        first = next(i for i in sess.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.out_names = ["logits"] + [n.replace("past_key_values.", "present.") for n in self.past_names]
        self._cache: list[np.ndarray] = []  # [B, kv, capacity, D] per past name, shared by past and present
        self._length = 0  # positions held
        # After a prompt, the session's arena hands its free regions back (the prompt's [B, S, vocab] logits and
        # their copies), decode steps keep theirs: SmolLM2 with 8 x 512-token prompts, 2 threads, resident memory
        # per session 2.28 -> 1.24 GB; 12 sessions without it ran benchmarks/export.py out of 24 GB. Cost, one
        # process, 3 alternating rounds: batch-8 prefill 324-428 against 423-564 tokens/s (the arena regrows each
        # prompt), batch 1 prefill and decode level (486-518 / 463-569). Without any arena: 0.45 GB.
        self._shrink = None
        if sess.get_session_options().enable_cpu_mem_arena:  # shrinking a session without one is an error
            import onnxruntime as ort

            self._shrink = ort.RunOptions()
            self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def forward(self, ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids [B, S] int64 with `past` ([B, kv, P, D] per name) -> logits [B, S, V], present."""
        b, s = ids.shape
        p = 0 if past is None else past[0].shape[2]
        if past is None:
            past = [np.zeros((b, self.kv_heads, 0, self.head_dim), np.float32)] * len(self.past_names)
        logits, *present = self.sess.run(
            self.out_names, {**self._positions(ids, p), **dict(zip(self.past_names, past))}
        )
        return logits, present

    def _positions(self, ids: np.ndarray, p: int) -> dict[str, np.ndarray]:
        b, s = ids.shape
        return {
            "input_ids": ids,
            "attention_mask": np.ones((b, p + s), np.int64),
            "position_ids": np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy(),
        }

    def _run_in_place(self, ids: np.ndarray) -> np.ndarray:
        """ids [B, S] after the `_length` cached positions -> logits [B, S, V]; the cache grows by S in place."""
        import onnxruntime as ort

        b, s = ids.shape
        need = self._length + s
        if not self._cache or self._cache[0].shape[2] < need:  # a larger buffer, the held positions copied over
            shape = (b, self.kv_heads, need + self.GROW, self.head_dim)
            grown = [np.zeros(shape, np.float32) for _ in self.past_names]
            for new, old in zip(grown, self._cache):
                new[:, :, : self._length] = old[:, :, : self._length]
            self._cache = grown
        io = self.sess.io_binding()
        for name, value in self._positions(ids, self._length).items():
            io.bind_cpu_input(name, value)
        for name, out, buf in zip(self.past_names, self.out_names[1:], self._cache):
            shared = ort.OrtValue.ortvalue_from_numpy(buf)  # wraps the array's memory, no copy
            io.bind_ortvalue_input(name, shared)
            io.bind_ortvalue_output(out, shared)
        io.bind_output("logits")
        self.sess.run_with_iobinding(io, self._shrink if s > 1 else None)
        self._length = need
        return io.get_outputs()[-1].numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self._cache, self._length = [], 0
        logits = self._run_in_place(ids.astype(np.int64))
        return logits[:, -1].argmax(-1)[:, None].astype(np.int64)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        logits = self._run_in_place(tokens.astype(np.int64))
        return logits[:, -1].argmax(-1)[:, None].astype(np.int64)


def perplexity(dec: OrtDecoder, windows: list[np.ndarray]) -> float:
    """exp(mean next-token negative log-likelihood) over windows of token ids, as eval does."""
    nll, count = 0.0, 0
    for w in windows:
        logits, _ = dec.forward(w[None].astype(np.int64))
        nll -= loop.target_logprobs(logits[0, :-1], w[1:]).sum()
        count += len(w) - 1
    return float(np.exp(nll / count))
