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
    `step` (the loop protocol) keep the cache between calls."""

    runtime = "onnxruntime"

    def __init__(self, sess, kernel: str = "onnxruntime CPU") -> None:
        self.sess = sess
        self.kernel = kernel
        self._past: list[np.ndarray] | None = None
        self.past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        first = next(i for i in sess.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]
        self.out_names = ["logits"] + [n.replace("past_key_values.", "present.") for n in self.past_names]

    def forward(self, ids: np.ndarray, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids [B, S] int64 with `past` ([B, kv, P, D] per name) -> logits [B, S, V], present."""
        b, s = ids.shape
        p = 0 if past is None else past[0].shape[2]
        if past is None:
            past = [np.zeros((b, self.kv_heads, 0, self.head_dim), np.float32)] * len(self.past_names)
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((b, p + s), np.int64),
            "position_ids": np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy(),
            **dict(zip(self.past_names, past)),
        }
        logits, *present = self.sess.run(self.out_names, feed)
        return logits, present

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        logits, self._past = self.forward(ids.astype(np.int64))
        return logits[:, -1].argmax(-1)[:, None].astype(np.int64)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        logits, self._past = self.forward(tokens, self._past)
        return logits[:, -1].argmax(-1)[:, None].astype(np.int64)


def perplexity(dec: OrtDecoder, windows: list[np.ndarray]) -> float:
    """exp(mean next-token negative log-likelihood) over windows of token ids, as eval does."""
    nll, count = 0.0, 0
    for w in windows:
        logits, _ = dec.forward(w[None].astype(np.int64))
        nll -= loop.target_logprobs(logits[0, :-1], w[1:]).sum()
        count += len(w) - 1
    return float(np.exp(nll / count))
