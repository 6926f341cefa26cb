"""A Llama-family decoder with KV cache as an ONNX graph for ONNX Runtime's CPU kernels.

Inputs and outputs use the names decoder tooling expects:
    input_ids [B, S], attention_mask [B, T], position_ids [B, S],
    past_key_values.{i}.key/value [B, kv_heads, P, head_dim]  (T = P + S)
    -> logits [B, S, V], present.{i}.key/value [B, kv_heads, T, head_dim]
Per layer: SimplifiedLayerNormalization (RMSNorm, fused with the residual add), q/k/v as one
matmul, RotaryEmbedding at position_ids, GroupQueryAttention (causal, KV cache), o_proj,
gate/up as one matmul, SiLU, down_proj. Quantized linears are `MatMulNBits` with the
checkpoint's own integers; the rest is float32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from compress.errors import UsageError
from compress.export import tables
from compress.export.onnx_graph import (
    FLOAT,
    INT64,
    MS,
    Graph,
    NBits,
    concat_nbits,
    gather_nbits,
    matmul_dense,
    matmul_nbits,
    nbits_block,
    nbits_from_stored,
    pack_nbits,
    rtn_nbits,
    with_refined_rows,
)
from compress.export.widths import tied
from compress.formats.stored import StoredLinear

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Options:
    accuracy_level: int | None = None  # MatMulNBits: 0/1 float32 math (exact), 4 int8 activations; None: see `resolved`
    lm_head_bits: int | None = None  # quantize the output layer (round to nearest) to 4 or 8 bits
    act_int8: bool = False  # the checkpoint quantizes inputs of its quantized linears to int8 per token (w8a8)
    act_zero_point: bool = False  # ... with a zero point per token (w8a8-asym)
    embed_bits: int | None = None  # store the input embedding quantized (round to nearest) to 4 or 8 bits
    head_accuracy_level: int | None = None  # the quantized output layer's MatMulNBits level (None: accuracy_level)
    eight_bit_level: int | None = None  # 8-bit linears' level among other widths (None: accuracy_level)
    refined_rows: int | None = None  # a 4-bit table's most used rows refined (None: tables.REFINED_ROWS)


@dataclass
class Linear:
    """What one (or several fused) linear layers become: packed integers or a float matrix."""

    nbits: NBits | None
    dense: np.ndarray | None  # [N, K]
    bias: np.ndarray | None
    quantized: bool = False  # stored quantized in the checkpoint (its input may be quantized too)


def resolved(opts: Options, stored: dict[str, StoredLinear]) -> Options:
    """The accuracy level when none is asked: 0 (exact) for 4-bit weights; 4 for 8-bit ones,
    whose float32 path in ONNX Runtime 1.31 runs slower than a float32 MatMul (measured:
    benchmarks/export.py), while level 4's int8 kernels run faster; the same for an 8-bit output layer on its own."""
    if opts.accuracy_level is not None:
        return opts
    bits = {w.bits for w in stored.values() if w.kind == "int"}
    # an 8-bit output layer at level 0 ran decode at 0.54x PyTorch fp32 (SmolLM2, 8-bit table shared with the
    # embedding, the rest 4-bit at level 0): level 4 for it, as for 8-bit linears
    head_level = 4 if opts.lm_head_bits == 8 else None
    # mixed precision: 8-bit linears beside 4-bit ones take level 4 too, for the same reason
    eight = 4 if 8 in bits and len(bits) > 1 else None
    return dataclasses.replace(
        opts, accuracy_level=4 if bits == {8} else 0, head_accuracy_level=head_level, eight_bit_level=eight
    )


def check_supported(config) -> None:
    kind = getattr(config, "model_type", "?")
    if kind not in SUPPORTED:
        raise UsageError(f"ONNX export supports decoders of type {', '.join(SUPPORTED)}; this model is {kind!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UsageError(f"ONNX export supports SiLU MLPs; this model uses {config.hidden_act!r}")
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise UsageError("ONNX export supports rotary embeddings over the full head; this model uses a partial one")
    if getattr(config, "mlp_bias", False):
        raise UsageError("ONNX export does not support MLP biases")


def _linear(model: torch.nn.Module, stored: dict[str, StoredLinear], name: str) -> Linear:
    module = model.get_submodule(name)
    bias = None if module.bias is None else module.bias.detach().float().numpy()
    if name in stored:
        nb = nbits_from_stored(stored[name])
        if nb is not None:
            return Linear(nb, None, bias, True)
        return Linear(None, stored[name].dequantized().numpy(), bias, True)
    return Linear(None, module.weight.detach().float().numpy(), bias)


def _fused(parts: list[Linear]) -> Linear | None:
    """One matmul for linears that read the same input, when their storage agrees."""
    biases = [p.bias for p in parts]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    bias = None if biases[0] is None else np.concatenate(biases)
    if len({p.quantized for p in parts}) > 1:
        return None
    if all(p.nbits is not None for p in parts):
        nb = concat_nbits([p.nbits for p in parts])
        return None if nb is None else Linear(nb, None, bias, parts[0].quantized)
    if all(p.dense is not None for p in parts):
        return Linear(None, np.concatenate([p.dense for p in parts]), bias, parts[0].quantized)
    return None


def per_token_int8(g: Graph, x: str, zero_point: bool = False) -> str:
    """x rounded to int8 per token (last axis) and back, as compressed-tensors' dynamic
    symmetric per-token activations: s = absmax / 127.5, q = clamp(round(x / s), -128, 127)."""
    if zero_point:
        return _per_token_int8_zp(g, x)
    absmax = g.op("ReduceMax", [g.op("Abs", [x]), g.const("last_axis", np.array([-1], dtype=np.int64))], keepdims=1)
    scale = g.op(
        "Max",
        [
            g.op("Div", [absmax, g.const("half_range", np.array(127.5, dtype=np.float32))]),
            g.const("tiny_scale", np.array(np.finfo(np.float32).tiny, dtype=np.float32)),
        ],
    )
    q = g.op(
        "Clip",
        [
            g.op("Round", [g.op("Div", [x, scale])]),
            g.const("int8_min", np.array(-128.0, dtype=np.float32)),
            g.const("int8_max", np.array(127.0, dtype=np.float32)),
        ],
    )
    return g.op("Mul", [q, scale])


def _per_token_int8_zp(g: Graph, x: str) -> str:
    """The asymmetric form (w8a8-asym): over [lo, hi] = [min(x, 0), max(x, 0)] per token, s = (hi - lo) / 255,
    z = round(clamp(-128 - lo / s, -128, 127)), q = clamp(round(x / s) + z, -128, 127), x ~ (q - z) * s."""
    axis = g.const("last_axis", np.array([-1], dtype=np.int64))
    zero = g.const("zero_f", np.array(0.0, dtype=np.float32))
    lo = g.op("Min", [g.op("ReduceMin", [x, axis], keepdims=1), zero])
    hi = g.op("Max", [g.op("ReduceMax", [x, axis], keepdims=1), zero])
    scale = g.op(
        "Max",
        [
            g.op("Div", [g.op("Sub", [hi, lo]), g.const("uint8_range", np.array(255.0, dtype=np.float32))]),
            g.const("tiny_scale", np.array(np.finfo(np.float32).tiny, dtype=np.float32)),
        ],
    )
    qmin = g.const("int8_min", np.array(-128.0, dtype=np.float32))
    qmax = g.const("int8_max", np.array(127.0, dtype=np.float32))
    zp = g.op("Round", [g.op("Clip", [g.op("Sub", [qmin, g.op("Div", [lo, scale])]), qmin, qmax])])
    q = g.op("Clip", [g.op("Add", [g.op("Round", [g.op("Div", [x, scale])]), zp]), qmin, qmax])
    return g.op("Mul", [g.op("Sub", [q, zp]), scale])


def _apply(g: Graph, x: str, name: str, lin: Linear, opts: Options) -> str:
    if opts.act_int8 and lin.quantized:
        x = per_token_int8(g, x, opts.act_zero_point)
    if lin.nbits is not None:
        eight = lin.nbits.bits == 8 and opts.eight_bit_level is not None
        return matmul_nbits(g, x, name, lin.nbits, opts.eight_bit_level if eight else opts.accuracy_level, lin.bias)
    return matmul_dense(g, x, name, lin.dense, lin.bias)


def _projections(g: Graph, x: str, name: str, lins: list[Linear], opts: Options) -> list[str]:
    fused = _fused(lins)
    if fused is None:
        return [_apply(g, x, f"{name}.{i}", lin, opts) for i, lin in enumerate(lins)]
    y = _apply(g, x, name, fused, opts)
    sizes = [lin.nbits.n if lin.nbits is not None else lin.dense.shape[0] for lin in lins]
    return g.op("Split", [y, g.const(f"{name}.split", np.array(sizes, dtype=np.int64))], outs=len(lins), axis=-1)


def rotary_frequencies(model: torch.nn.Module, cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(inv_freq [head_dim/2], attention scaling) when cos/sin are exactly cos(p * inv_freq) * scaling at every
    position p (static RoPE: the default and most scalings), so the graph can compute the rows it needs instead of
    storing the tables (SmolLM2: 2.1 MB of 8,192 positions); None otherwise (position-dependent variants)."""
    rope = model.model.rotary_emb
    inv_freq = getattr(rope, "inv_freq", None)
    if inv_freq is None or inv_freq.shape[-1] != cos.shape[-1]:
        return None
    inv_freq = inv_freq.float().numpy()
    scaling = float(getattr(rope, "attention_scaling", 1.0))
    freqs = np.arange(cos.shape[0], dtype=np.float32)[:, None] * inv_freq[None]  # as torch: fp32
    if not (
        np.allclose(np.cos(freqs) * scaling, cos, atol=1e-5) and np.allclose(np.sin(freqs) * scaling, sin, atol=1e-5)
    ):
        return None
    return inv_freq, scaling


def rotary_rows(g: Graph, total: str, one: str, inv_freq: np.ndarray, scaling: float) -> tuple[str, str]:
    """cos/sin [total, head_dim/2] for positions 0 .. total-1 (total: the attention mask's length, int64; one: the
    int64 constant 1), computed in the graph: each call needs only the positions it can see."""
    zero = g.const("zero_i64", np.array(0, dtype=np.int64))
    positions = g.op("Cast", [g.op("Range", [zero, total, one])], to=onnx.TensorProto.FLOAT)
    column = g.op("Unsqueeze", [positions, g.const("axis_last", np.array([1], dtype=np.int64))])
    freqs = g.op("Mul", [column, g.const("rope_inv_freq", inv_freq[None].astype(np.float32))])  # [total, half]
    cos, sin = g.op("Cos", [freqs]), g.op("Sin", [freqs])
    if scaling != 1.0:
        factor = g.const("rope_scaling", np.array(scaling, dtype=np.float32))
        cos, sin = g.op("Mul", [cos, factor]), g.op("Mul", [sin, factor])
    return cos, sin


def rotary_caches(model: torch.nn.Module, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2] from the model's own rotary module, so every RoPE
    variant transformers implements (base, scaling, attention factor) carries over."""
    rope = model.model.rotary_emb
    pos = torch.arange(max_positions).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rope(torch.zeros(1, dtype=torch.float32), pos)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def build(
    model: torch.nn.Module,
    stored: dict[str, StoredLinear],
    opts: Options,
    head: NBits | None = None,
    table: NBits | None = None,
) -> onnx.ModelProto:
    """head: the rounded output layer when opts.lm_head_bits (default: `quantized_output_layer`); table: the rounded
    input embedding when opts.embed_bits (default: `quantized_table` of it). A head that is the table (a tied model)
    is stored once."""
    cfg = model.config
    check_supported(cfg)
    n_layers, hidden, vocab = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    eps = float(cfg.rms_norm_eps)
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    max_pos = int(getattr(cfg, "max_position_embeddings", 4096))

    g = Graph()
    ids = g.input("input_ids", INT64, ["batch", "seq"])
    mask = g.input("attention_mask", INT64, ["batch", "total"])
    pos = g.input("position_ids", INT64, ["batch", "seq"])
    pasts = [
        (
            g.input(f"past_key_values.{i}.key", FLOAT, ["batch", kv_heads, "past", head_dim]),
            g.input(f"past_key_values.{i}.value", FLOAT, ["batch", kv_heads, "past", head_dim]),
        )
        for i in range(n_layers)
    ]
    if opts.embed_bits:
        table = table or quantized_table(model.get_input_embeddings().weight, opts.embed_bits, "--embed-bits")
    embed = None if table else g.const("model.embed_tokens.weight", _weight(model.get_input_embeddings()))
    one = g.const("one_i64", np.array(1, dtype=np.int64))
    total_i64 = g.op("Gather", [g.op("Shape", [mask]), one], axis=0)  # past and new positions
    cos, sin = rotary_caches(model, max_pos)
    static = rotary_frequencies(model, cos, sin)
    if static:
        cos, sin = rotary_rows(g, total_i64, one, *static)
    else:
        cos, sin = g.const("cos_cache", cos), g.const("sin_cache", sin)

    # GroupQueryAttention's lengths: index of each row's last token, and the total length.
    summed = g.op("ReduceSum", [mask, g.const("axis1", np.array([1], dtype=np.int64))], keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [summed, one])], to=onnx.TensorProto.INT32)
    total = g.op("Cast", [total_i64], to=onnx.TensorProto.INT32)

    x = gather_nbits(g, ids, "model.embed_tokens", table) if table else g.op("Gather", [embed, ids], axis=0)
    residual, pending = x, None  # pending: the block output still to be added to the residual
    for i in range(n_layers):
        p = f"model.layers.{i}"
        ln1 = g.const(f"{p}.input_layernorm.weight", _vec(model, f"{p}.input_layernorm"))
        if pending is None:
            h = g.op("SimplifiedLayerNormalization", [residual, ln1], axis=-1, epsilon=eps, stash_type=1)
        else:
            h, residual = g.op(
                "SkipSimplifiedLayerNormalization", [pending, residual, ln1], outs="x--x", domain=MS, epsilon=eps
            )

        qkv = [_linear(model, stored, f"{p}.self_attn.{n}_proj") for n in "qkv"]
        q, k, v = _projections(g, h, f"{p}.self_attn.qkv_proj", qkv, opts)
        if hasattr(model.get_submodule(f"{p}.self_attn"), "q_norm"):  # qwen3: each head's queries and keys
            q = _per_head_norm(g, q, model, f"{p}.self_attn.q_norm", head_dim, eps)
            k = _per_head_norm(g, k, model, f"{p}.self_attn.k_norm", head_dim, eps)
        q = g.op("RotaryEmbedding", [q, pos, cos, sin], domain=MS, interleaved=0, num_heads=heads)
        k = g.op("RotaryEmbedding", [k, pos, cos, sin], domain=MS, interleaved=0, num_heads=kv_heads)
        attn, pk, pv = g.op(
            "GroupQueryAttention",
            [q, k, v, *pasts[i], seqlens_k, total],
            outs=3,
            domain=MS,
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=float(head_dim**-0.5),
            local_window_size=int(window) if window else -1,
        )
        g.output(pk, f"present.{i}.key", FLOAT, ["batch", kv_heads, "total", head_dim])
        g.output(pv, f"present.{i}.value", FLOAT, ["batch", kv_heads, "total", head_dim])
        attn = _apply(g, attn, f"{p}.self_attn.o_proj", _linear(model, stored, f"{p}.self_attn.o_proj"), opts)

        ln2 = g.const(f"{p}.post_attention_layernorm.weight", _vec(model, f"{p}.post_attention_layernorm"))
        h, residual = g.op(
            "SkipSimplifiedLayerNormalization", [attn, residual, ln2], outs="x--x", domain=MS, epsilon=eps
        )
        gate_up = [_linear(model, stored, f"{p}.mlp.{n}_proj") for n in ("gate", "up")]
        gate, up = _projections(g, h, f"{p}.mlp.gate_up_proj", gate_up, opts)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # SiLU(gate) * up
        pending = _apply(g, act, f"{p}.mlp.down_proj", _linear(model, stored, f"{p}.mlp.down_proj"), opts)

    norm = g.const("model.norm.weight", _vec(model, "model.norm"))
    h = g.op("SkipSimplifiedLayerNormalization", [pending, residual, norm], outs=1, domain=MS, epsilon=eps)
    g.output(
        _lm_head(g, model, stored, h, ids, embed, vocab, hidden, opts, head, table),
        "logits",
        FLOAT,
        ["batch", "seq", vocab],
    )
    return g.model(f"{cfg.model_type}-decoder")


def _per_head_norm(g: Graph, x: str, model: torch.nn.Module, name: str, head_dim: int, eps: float) -> str:
    """RMSNorm over each head's head_dim values: x [B, S, heads * head_dim] -> the same shape."""
    heads = g.op("Reshape", [x, g.const("per_head_shape", np.array([0, 0, -1, head_dim], dtype=np.int64))])
    normed = g.op(
        "SimplifiedLayerNormalization", [heads, g.const(f"{name}.weight", _vec(model, name))], axis=-1, epsilon=eps,
        stash_type=1,
    )  # fmt: skip
    return g.op("Reshape", [normed, g.const("merged_heads_shape", np.array([0, 0, -1], dtype=np.int64))])


def quantized_table(
    weight: torch.Tensor,
    bits: int,
    option: str,
    hessian: torch.Tensor | None = None,
    refined_rows: torch.Tensor | None = None,
) -> NBits:
    """A [rows, hidden] table (output layer, embedding) on `bits`, float16 scales. 8 bits: symmetric, blocks of 32,
    rounded to nearest. 4 bits (tables.TABLE_GRID): a zero point per block of 16, by GPTQ against `hessian` (the
    output layer's inputs: export/tables.py), else rounded to nearest; `refined_rows` with their rounding error rounded
    again."""
    w = weight.detach().float().numpy()
    symmetric, block = (True, 32) if bits == 8 else tables.TABLE_GRID
    block = block if w.shape[1] % block == 0 else nbits_block(w.shape[1], None)
    if block is None:
        raise UsageError(f"{option}: no MatMulNBits block length divides the hidden size {w.shape[1]}")
    if hessian is None:
        table = rtn_nbits(w, bits, block, symmetric)
    else:
        q, scale, zp = tables.calibrated(
            weight, hessian, bits, block, torch.float16, symmetric, dampening=tables.TABLE_DAMPENING
        )
        table = pack_nbits(q.numpy(), scale.float().numpy(), zp.numpy(), bits, block)
    return table if refined_rows is None or bits == 8 else with_refined_rows(table, w, refined_rows.numpy())


def quantized_output_layer(
    model: torch.nn.Module, bits: int, hessian: torch.Tensor | None = None, refined_rows: torch.Tensor | None = None
) -> NBits:
    return quantized_table(model.get_output_embeddings().weight, bits, "--lm-head-bits", hessian, refined_rows)


def _weight(module: torch.nn.Module) -> np.ndarray:
    return module.weight.detach().float().numpy()


def _lm_head(
    g: Graph,
    model,
    stored,
    h: str,
    ids: str,
    embed: str | None,
    vocab: int,
    hidden: int,
    opts: Options,
    rounded: NBits | None,
    table: NBits | None,
) -> str:
    if opts.lm_head_bits:
        rounded = rounded or quantized_output_layer(model, opts.lm_head_bits)
        name = "model.embed_tokens" if rounded is table else "lm_head"  # the same initializers as the embedding's
        level = opts.accuracy_level if opts.head_accuracy_level is None else opts.head_accuracy_level
        return matmul_nbits(g, h, name, rounded, level)
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    if name in stored:
        return _apply(g, h, "lm_head", _linear(model, stored, name), opts)
    shared = tied(model)
    if shared and embed is None:
        raise UsageError("a tied output layer shares the quantized embedding: give it the same bits")
    weight = embed if shared else g.const("lm_head.weight", _weight(head))
    # Gemm reads the [V, H] matrix transposed in place: a tied output layer shares the embedding.
    flat = g.op("Reshape", [h, g.const("flat_shape", np.array([-1, hidden], dtype=np.int64))])
    logits = g.op("Gemm", [flat, weight], transB=1)
    bs = g.op(
        "Slice",
        [
            g.op("Shape", [ids]),
            g.const("zero1", np.array([0], dtype=np.int64)),
            g.const("two1", np.array([2], dtype=np.int64)),
        ],
    )
    shape = g.op("Concat", [bs, g.const("vocab1", np.array([vocab], dtype=np.int64))], axis=0)
    return g.op("Reshape", [logits, shape])


def _vec(model: torch.nn.Module, name: str) -> np.ndarray:
    return model.get_submodule(name).weight.detach().float().numpy()
