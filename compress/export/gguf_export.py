"""Export a Llama-family checkpoint to GGUF (llama.cpp) with the `gguf` package.

Where our grid is exactly a GGUF block type the values carry over: symmetric int8 with
groups that are multiples of 32 (or per channel) is Q8_0 (scale d, 32 int8), symmetric int4
likewise is Q4_0 (d, 32 codes q + 8), int4 with zero points is Q4_1 (d, minimum m, 32 codes);
a group of 64 is two blocks with the same d; int5 is Q5_0 / Q5_1. The block scale d (and m) is float16, so a
value float16 cannot hold exactly is rounded: counted and reported. With zero points, int4/int5 in rows of
multiples of 256 become the k-quants Q4_K/Q5_K (gguf_kquants: our integers, their scales rounded to 6 bits),
smaller by 0.5 bits a weight, and symmetric int3/int6 in groups of 16 become Q3_K/Q6_K, with the error reported.
Anything else (fp8, int6 outside Q6_K, asymmetric int8, groups that are not multiples of 32) is re-quantized to
Q8_0 from its de-quantized values, with the error it costs.
Unquantized weights keep their dtype (bf16/f16/f32), except the embedding and output layer of a checkpoint with
integer weights: Q8_0 by default (as llama.cpp's own mixes keep them at 6-8 bits); norms are f32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from compress.errors import UsageError
from compress.export import gguf_kquants, tables, widths
from compress.formats.stored import StoredLinear, read
from compress.models.load import Loaded

FILE = "model.gguf"
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
LAYER_NAMES = {  # HF name inside a layer -> GGUF name inside blk.N
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",  # qwen3: RMSNorm of each head's queries and keys, before the rotation
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


EXACT, REQUANTIZED, KQUANT, TABLE = "exact", "requantized", "kquant", "table"  # how a weight reached the file


@dataclass
class GgufCheck:
    verdict: str
    tensors_compared: int
    max_abs_diff_exact: float  # over the tensors carried over exactly: 0 when the read-back matches
    requantized_rel_error: float | None  # ||W_gguf - W|| / ||W|| over the re-quantized ones
    kquant_rel_error: float | None = None  # the same over our integers as k-quants (their scales' rounding)
    table_rel_error: float | None = None  # the same over the embedding / output layer rounded to nearest


@dataclass
class GgufExported:
    path: str
    tensors: int
    exact: int  # quantized linears carried over as GGUF blocks
    requantized: int
    rounded_scales: int  # block scales (and Q4_1 minimums) float16 could not hold exactly
    types: dict[str, int]
    check: GgufCheck
    notes: list[str] = field(default_factory=list)
    kquant: int = 0  # quantized linears whose integers were re-expressed as Q3_K..Q6_K (sub-block scales rounded)
    kquant_worst_rel_error: float | None = None  # the largest of one tensor's k-quant fit error
    embed_bits: int | None = None  # token_embd (and a tied output layer) rounded to nearest: 8 Q8_0, 4 Q4_0
    lm_head_bits: int | None = None  # an untied output layer likewise
    file_bytes: int = 0


def _permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Llama rotary pairs dims (2i, 2i+1); transformers pairs (i, i + d/2): reorder
    q/k rows the way llama.cpp's converter does. Rows move whole, so blocks along K stay intact."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q_blocks(
    q: np.ndarray, scale: np.ndarray, bits: int, zero_point: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """q [N, K] int8, scale [N, K/32] float32 -> Q8_0 / Q5_0 / Q4_0 bytes [N, K/32 * block bytes], or Q5_1 / Q4_1
    when zero_point [N, K/32] is given; and how many block scales (and minimums) float16 rounded.
    Q4_1 stores w = d * u + m with u in 0..15: ours is (q - zp) * s with u = q + 8, so d = s and
    m = -(8 + zp) * s (exact in float32: 8 bits of a bf16 scale times an integer up to 16); Q5_1 likewise
    with u = q + 16."""
    n, k = q.shape
    d = scale.astype(np.float16)
    rounded = int((d.astype(np.float32) != scale).sum())
    head = [d.reshape(n, k // 32, 1).view(np.uint8).reshape(n, k // 32, 2)]
    offset = 1 << (bits - 1)
    if zero_point is not None:
        m32 = -(offset + zero_point.astype(np.float32)) * scale
        m = m32.astype(np.float16)
        rounded += int((m.astype(np.float32) != m32).sum())
        head.append(m.reshape(n, k // 32, 1).view(np.uint8).reshape(n, k // 32, 2))
    qb = q.reshape(n, k // 32, 32)
    if bits == 8:
        body = qb.view(np.uint8)
    else:  # Q4/Q5: byte j holds element j (low nibble) and element j + 16 (high nibble)
        u = (qb.astype(np.int16) + offset).astype(np.uint8)
        body = (u[..., :16] & 0x0F) | ((u[..., 16:] & 0x0F) << 4)
        if bits == 5:  # Q5: bit 4 of element j is bit j of a little-endian uint32 before the nibbles
            body = np.concatenate([np.packbits(u >> 4, axis=-1, bitorder="little"), body], axis=-1)
    blocks = np.concatenate([*head, body], axis=-1)
    return blocks.reshape(n, -1), rounded


def exact_type(w: StoredLinear) -> str | None:
    """The GGUF type our grid is exactly, or None. Symmetric int3 and int2 values are int4 values
    on the same scale, so they are Q4_0 exactly (4.5 bits a weight, where their k-quants would be
    smaller but not exact); with zero points, int4/3/2 are Q4_1 (5 bits a weight); int5 is Q5_0
    (5.5 bits) or with zero points Q5_1 (6 bits). int6, int7 and asymmetric int8 have no GGUF block type."""
    k = w.q.shape[1]
    if w.kind != "int" or w.bits in (6, 7) or w.bits > 8 or k % 32 or (not w.symmetric and w.bits == 8):
        return None
    if w.group_size is not None and w.group_size % 32:
        return None
    if w.bits <= 5:
        return f"Q{max(w.bits, 4)}_{0 if w.symmetric else 1}"
    return "Q8_0"


def export(
    loaded: Loaded, dest: Path, k_quants: bool = True, lm_head_bits: int | None = None, embed_bits: int | None = None
) -> GgufExported:
    """k_quants: asymmetric int4/int5 (groups of 32k) become Q4_K/Q5_K and symmetric int3/int6 (groups of 16k)
    Q3_K/Q6_K where rows are multiples of 256 (else the exact 32-blocks, or Q8_0 for what has none).
    lm_head_bits / embed_bits: 8 (Q8_0), 4 (Q4_0), 0 float; None: widths.table_widths' default."""
    import gguf

    model, cfg = loaded.model, loaded.model.config
    arch = ARCHS.get(getattr(cfg, "model_type", ""))
    if loaded.task != "causal-lm" or arch is None:
        raise UsageError(
            f"GGUF export supports decoders of type {', '.join(ARCHS)}; this model is "
            f"{getattr(cfg, 'model_type', '?')!r}"
        )
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise UsageError(f"GGUF export: rope type {rope.get('rope_type')!r} is not mapped yet")
    stored = read(loaded.checkpoint)
    src_dtype = json.loads((loaded.checkpoint / "config.json").read_text()).get("dtype", "float32")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))

    w = gguf.GGUFWriter(str(dest / FILE), arch)
    w.add_name(loaded.checkpoint.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)  # llama.cpp assumes hidden / heads unless told (qwen3: 128 where that is 64)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    pre = _tokenizer(w, loaded.checkpoint)

    tied = widths.tied(model)
    if tied and None not in (lm_head_bits, embed_bits) and lm_head_bits != embed_bits:
        raise UsageError(
            f"this model ties its output layer to the embedding (one GGUF tensor): --lm-head-bits {lm_head_bits} and "
            f"--embed-bits {embed_bits} cannot both hold; give one width"
        )
    head_bits, embed_bits = widths.table_widths(
        lm_head_bits, embed_bits, any(x.kind == "int" for x in stored.values()), tied, untied_embedding=True
    )
    out = GgufExported(str(dest / FILE), 0, 0, 0, 0, {}, GgufCheck("", 0, 0.0, None))
    out.embed_bits, out.lm_head_bits = embed_bits, None if tied else head_bits
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    # a 4-bit output layer (the tied table too) by GPTQ on its inputs, as in ONNX (export/tables.py)
    calibrate = {"model.embed_tokens"} if tied and embed_bits == 4 else {head_name} if head_bits == 4 else set()
    hessian = tables.output_calibration(model, loaded.tokenizer).hessian if calibrate else None
    expected: dict[str, tuple[np.ndarray, str]] = {}  # GGUF name -> (float32 weights, how it reached the file)

    def add(name: str, hf: str, permute_heads: int | None = None, bits: int | None = None) -> None:
        """hf: the module whose weight this is (stored quantized, or plain; bits: round a plain one)."""
        ref = stored[hf].dequantized().numpy() if hf in stored else _weight(model, hf)
        if permute_heads:
            ref = _permute_rows(ref, permute_heads)
        if hf in stored:
            arr, kind, category = _quantized(stored[hf], ref, permute_heads, out, k_quants)
        elif hf in calibrate and ref.shape[1] % 32 == 0:
            q, scale, _ = tables.calibrated(torch.from_numpy(ref), hessian, 4, 32, torch.float16)
            arr, kind, category = q_blocks(q.numpy(), scale.float().numpy(), 4)[0], "Q4_0", TABLE
        else:
            arr, kind, category = _plain(ref, src_dtype, bits)
        if kind in ("F32", "F16"):
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        out.tensors += 1
        out.types[kind] = out.types.get(kind, 0) + 1
        expected[name] = (ref, category)

    add("token_embd.weight", "model.embed_tokens", bits=embed_bits)
    for i in range(cfg.num_hidden_layers):
        for hf, name in LAYER_NAMES.items():
            full = f"model.layers.{i}.{hf}"
            perm = {"attn_q": heads, "attn_k": kv_heads}.get(name) if arch == "llama" else None
            if name.endswith("norm"):
                attn = model.get_submodule(f"model.layers.{i}.self_attn")
                if name in ("attn_q_norm", "attn_k_norm") and not hasattr(attn, hf.rpartition(".")[2]):
                    continue  # only qwen3 has them
                w.add_tensor(f"blk.{i}.{name}.weight", _weight(model, full))
                out.tensors += 1
                continue
            add(f"blk.{i}.{name}.weight", full, perm)
            bias = model.get_submodule(full).bias
            if bias is not None:
                w.add_tensor(f"blk.{i}.{name}.bias", bias.detach().float().numpy())
                out.tensors += 1
    w.add_tensor("output_norm.weight", _weight(model, "model.norm"))
    out.tensors += 1
    if not tied:
        add("output.weight", head_name, bits=head_bits)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out.check = read_back(dest / FILE, expected)
    if out.requantized:
        out.notes.append(
            f"{out.requantized} quantized linears have no exact GGUF type; re-quantized to Q8_0 "
            f"(relative weight error {out.check.requantized_rel_error:.2e})"
        )
    if out.kquant:
        out.notes.append(
            f"{out.kquant} quantized linears: our integers as "
            f"{'/'.join(sorted(set(out.types) & {'Q3_K', 'Q4_K', 'Q5_K', 'Q6_K'}))} (sub-block scales and minimums "
            f"rounded to the k-quant's codes: relative weight error {out.check.kquant_rel_error:.2e}, worst tensor "
            f"{out.kquant_worst_rel_error:.2e}); --no-k-quants keeps the exact 32-blocks (Q4_0/Q4_1/Q5_0/Q5_1) where "
            "there are some"
        )
    if embed_bits or out.lm_head_bits:
        rtn, gptq = "rounded to nearest with gguf's quantizer", "by GPTQ on the output layer's inputs (Q4_0)"
        parts = []
        if embed_bits:
            parts.append(
                f"token_embd (also the tied output layer) {gptq if calibrate else rtn}" if tied else f"token_embd {rtn}"
            )
        if out.lm_head_bits:
            parts.append(f"output {gptq if calibrate else rtn}")
        out.notes.append(
            f"{'; '.join(parts)} (relative weight error {out.check.table_rel_error:.2e}); "
            "--embed-bits/--lm-head-bits 0 keep them float"
        )
    if out.rounded_scales:
        out.notes.append(
            f"{out.rounded_scales} block scales or minimums were rounded to float16 (GGUF stores them as float16)"
        )
    if pre == "default":
        out.notes.append(
            "tokenizer.ggml.pre is 'default' (this tokenizer's pre-tokenizer is not one compress recognises): "
            "llama.cpp may split some raw text differently from the HF tokenizer"
        )
    out.file_bytes = (dest / FILE).stat().st_size
    (dest / "export.json").write_text(json.dumps(asdict(out), indent=2) + "\n")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (loaded.checkpoint / f).is_file():
            (dest / f).write_bytes((loaded.checkpoint / f).read_bytes())
    return out


def _quantized(
    s: StoredLinear, dense: np.ndarray, permute_heads: int | None, out: GgufExported, k_quants: bool
) -> tuple[np.ndarray, str, bool]:
    """dense: s de-quantized (rows permuted like q/scale), for the types that re-quantize."""
    kquant = gguf_kquants.kind(s.q.shape[1], s.group_size, s.bits, s.symmetric) if s.kind == "int" else None
    kind = exact_type(s)
    if k_quants and kquant is not None:
        q, scale, zp = _blocked(s, gguf_kquants.sub_block(s.symmetric), not s.symmetric, permute_heads)
        if s.symmetric:
            blocks, rel = gguf_kquants.blocks_symmetric(q, scale, s.bits)
        else:
            blocks, rel = gguf_kquants.blocks(q, scale, zp, s.bits)
        out.kquant += 1
        out.kquant_worst_rel_error = max(out.kquant_worst_rel_error or 0.0, rel)
        return blocks, kquant, KQUANT
    if kind is not None:
        q, scale, zp = _blocked(s, 32, kind.endswith("_1"), permute_heads)
        blocks, rounded = q_blocks(q, scale, {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5}.get(kind, 4), zp)
        out.exact += 1
        out.rounded_scales += rounded
        return blocks, kind, EXACT if rounded == 0 else REQUANTIZED
    import gguf

    if dense.shape[1] % 32:
        out.requantized += 1
        return dense, "F32", REQUANTIZED
    out.requantized += 1
    return gguf.quants.quantize(dense, gguf.GGMLQuantizationType.Q8_0), "Q8_0", REQUANTIZED


def _blocked(
    s: StoredLinear, block: int, zero_points: bool, permute_heads: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Integers [N, K], a scale (and zero point) per `block` weights, rows in GGUF's order."""
    per_group = (s.group_size or s.q.shape[1]) // block
    scale = np.repeat(s.scale.numpy(), per_group, axis=1)
    zp = np.repeat(s.zero_point.numpy(), per_group, axis=1) if zero_points else None
    q = s.q.numpy()
    if permute_heads:
        q, scale = _permute_rows(q, permute_heads), _permute_rows(scale, permute_heads)
        zp = None if zp is None else _permute_rows(zp, permute_heads)
    return q, scale, zp


def _plain(arr: np.ndarray, src_dtype: str, bits: int | None = None) -> tuple[np.ndarray, str, str]:
    """A float32 weight in the checkpoint's own dtype (exact: the values came from it), or rounded to nearest on
    `bits` (8: Q8_0, 4: Q4_0, gguf's own quantizer, as llama.cpp rounds these tables) where rows hold whole blocks."""
    import gguf

    if bits and arr.shape[1] % 32 == 0:
        kind = "Q8_0" if bits == 8 else "Q4_0"
        return gguf.quants.quantize(arr, getattr(gguf.GGMLQuantizationType, kind)), kind, TABLE
    if src_dtype == "bfloat16":  # the checkpoint's own values, exactly
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16), "BF16", EXACT
    if src_dtype == "float16":
        return arr.astype(np.float16), "F16", EXACT
    return arr, "F32", EXACT


def read_back(path: Path, expected: dict[str, tuple[np.ndarray, str]]) -> GgufCheck:
    """Read the file with gguf's reader, de-quantize every weight and compare with ours: exact tensors must be
    identical; the others' relative error is measured per category (what the file costs against our weights)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    worst, n = 0.0, 0
    sums = {c: [0.0, 0.0] for c in (REQUANTIZED, KQUANT, TABLE)}
    for t in reader.tensors:
        if t.name not in expected:
            continue
        ref, category = expected[t.name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape).astype(np.float32)
        n += 1
        if category == EXACT:
            worst = max(worst, float(np.abs(got - ref).max()))
        else:
            sums[category][0] += float(((got - ref) ** 2).sum())
            sums[category][1] += float((ref**2).sum())
    rel = {c: (num / den) ** 0.5 if den else None for c, (num, den) in sums.items()}
    if n != len(expected):
        return GgufCheck(f"FAILED: {len(expected) - n} weights missing from the file", n, worst, None)
    verdict = "every exact tensor identical" if worst == 0 else f"FAILED: exact tensors differ by up to {worst:.3g}"
    return GgufCheck(verdict, n, worst, rel[REQUANTIZED], rel[KQUANT], rel[TABLE])


def _tokenizer(w, ckpt: Path) -> str:
    """Write the vocabulary, merges and special tokens; returns the pre-tokenizer name."""
    import gguf

    try:
        vocab = gguf.vocab.BpeVocab(ckpt)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(
            f"GGUF export needs a byte-level BPE tokenizer (tokenizer.json) beside the weights: {exc}"
        ) from None
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        types.append(ttype)
    pre = pre_tokenizer(json.loads((ckpt / "tokenizer.json").read_text()).get("pre_tokenizer"))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(ckpt, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    return pre


def pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's name for the tokenizer's way of splitting text before BPE, for the splits
    we can recognise from tokenizer.json; "default" otherwise (said in a note)."""

    def byte_level(p: dict) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if spec and byte_level(spec):
        return "gpt-2"
    parts = (spec or {}).get("pretokenizers", []) if (spec or {}).get("type") == "Sequence" else []
    if (
        len(parts) == 2
        and parts[0].get("type") == "Digits"
        and parts[0].get("individual_digits")
        and byte_level(parts[1])
    ):
        return "smollm"
    return "default"


def _weight(model: torch.nn.Module, module: str) -> np.ndarray:
    return model.get_submodule(module).weight.detach().float().numpy()
