"""A BERT-family encoder as an ONNX graph for ONNX Runtime's CPU kernels.

    input_ids [B, S], attention_mask [B, S], token_type_ids [B, S] -> last_hidden_state [B, S, H]
Embeddings + LayerNorm; per layer: q/k/v as one matmul, MultiHeadAttention with the padding
mask, output dense fused with residual + LayerNorm (SkipLayerNormalization), GELU MLP.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from compress.errors import UsageError
from compress.export.onnx_decoder import Options, _apply, _linear, _projections
from compress.export.onnx_graph import FLOAT, INT64, MS, Graph
from compress.formats.stored import StoredLinear

SUPPORTED = ("bert",)


def build(model: torch.nn.Module, stored: dict[str, StoredLinear], opts: Options) -> onnx.ModelProto:
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise UsageError(
            f"ONNX export supports encoders of type {', '.join(SUPPORTED)}; this model is {cfg.model_type!r}"
        )
    if cfg.hidden_act != "gelu" or getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise UsageError("ONNX export supports BERT with GELU and absolute position embeddings")
    eps, heads = float(cfg.layer_norm_eps), cfg.num_attention_heads
    g = Graph()
    ids = g.input("input_ids", INT64, ["batch", "seq"])
    mask = g.input("attention_mask", INT64, ["batch", "seq"])
    types = g.input("token_type_ids", INT64, ["batch", "seq"])

    emb = model.embeddings
    const = lambda name, t: g.const(name, t.detach().float().numpy())  # noqa: E731
    word = g.op("Gather", [const("embeddings.word_embeddings.weight", emb.word_embeddings.weight), ids], axis=0)
    seq = g.op("Shape", [ids], start=1, end=2)  # [1]: S
    zero = g.const("zero1", np.array([0], dtype=np.int64))
    pos = g.op(
        "Slice", [const("embeddings.position_embeddings.weight", emb.position_embeddings.weight), zero, seq, zero]
    )  # [S, H]
    tt = g.op(
        "Gather", [const("embeddings.token_type_embeddings.weight", emb.token_type_embeddings.weight), types], axis=0
    )
    x = g.op("Add", [g.op("Add", [word, pos]), tt])
    x = g.op(
        "LayerNormalization",
        [
            x,
            const("embeddings.LayerNorm.weight", emb.LayerNorm.weight),
            const("embeddings.LayerNorm.bias", emb.LayerNorm.bias),
        ],
        axis=-1,
        epsilon=eps,
    )
    key_mask = g.op("Cast", [mask], to=onnx.TensorProto.INT32)

    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}"
        layer = model.get_submodule(p)
        qkv = [_linear(model, stored, f"{p}.attention.self.{n}") for n in ("query", "key", "value")]
        q, k, v = _projections(g, x, f"{p}.attention.self.qkv", qkv, opts)
        a = g.op("MultiHeadAttention", [q, k, v, "", key_mask], domain=MS, num_heads=heads)
        a = _apply(g, a, f"{p}.attention.output.dense", _linear(model, stored, f"{p}.attention.output.dense"), opts)
        ln = layer.attention.output.LayerNorm
        x = g.op(
            "SkipLayerNormalization",
            [
                a,
                x,
                const(f"{p}.attention.output.LayerNorm.weight", ln.weight),
                const(f"{p}.attention.output.LayerNorm.bias", ln.bias),
            ],
            outs=1,
            domain=MS,
            epsilon=eps,
        )
        h = _apply(g, x, f"{p}.intermediate.dense", _linear(model, stored, f"{p}.intermediate.dense"), opts)
        h = g.op("Gelu", [h], domain=MS)  # erf GELU, as BERT's "gelu"
        h = _apply(g, h, f"{p}.output.dense", _linear(model, stored, f"{p}.output.dense"), opts)
        ln = layer.output.LayerNorm
        x = g.op(
            "SkipLayerNormalization",
            [h, x, const(f"{p}.output.LayerNorm.weight", ln.weight), const(f"{p}.output.LayerNorm.bias", ln.bias)],
            outs=1,
            domain=MS,
            epsilon=eps,
        )
    g.output(x, "last_hidden_state", FLOAT, ["batch", "seq", cfg.hidden_size])
    return g.model(f"{cfg.model_type}-encoder")


def feed(sess, ids: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    mask = np.ones_like(ids) if mask is None else mask
    return {
        "input_ids": ids.astype(np.int64),
        "attention_mask": mask.astype(np.int64),
        "token_type_ids": np.zeros_like(ids, dtype=np.int64),
    }
