"""Export a checkpoint to ONNX (decoders with KV cache, encoders) and check the result against
the PyTorch model loaded by our own transformers, on the exact weights the file carries."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from compress.data import text as textdata
from compress.data.tokens import windows
from compress.errors import CompressError, UsageError
from compress.export import onnx_decoder, onnx_encoder, onnx_genai, tables, widths
from compress.export.onnx_graph import NBITS, dequantize_nbits, nbits_block_of
from compress.formats import stored as stored_mod
from compress.models.load import Loaded
from compress.primitives.kl import kl_top1
from compress.primitives.qparams import INT8_ACTIVATIONS, fake_quantize_tokens
from compress.runtime import ort
from compress.runtime.loop import generate

MODEL_FILE = "model.onnx"
INLINE_LIMIT = 1_800_000_000  # protobuf caps a file at 2 GB: larger graphs keep weights beside it
CHECK_TOKENS = 64
CHECK_NEW_TOKENS = 16
QUALITY_WINDOW, QUALITY_TOKENS = 512, 1024  # per text: ~2 s each side for SmolLM2-135M on 2 threads


@dataclass
class Check:
    tokens: int
    max_abs_logit_diff: float
    logit_scale: float
    top1_agreement: float | None = None  # decoders: share of positions whose argmax matches PyTorch
    greedy_equal: int | None = None  # decoders: leading greedy tokens equal to PyTorch's
    greedy_of: int | None = None
    min_cosine: float | None = None  # encoders: lowest cosine of a token's hidden state to PyTorch's
    genai_greedy_equal: int | None = None  # decoders, when onnxruntime-genai is installed: leading greedy tokens
    # ONNX Runtime GenAI generates from the directory (genai_config.json) equal to our own loop's on the same file


@dataclass
class Quality:
    """The file's perplexity on a text, beside the checkpoint's in PyTorch (its own stored weights, the output layer
    and embedding as the checkpoint has them), and how far the file's next-token distributions moved from it."""

    text: str
    tokens: int
    perplexity: float  # ONNX Runtime, this file
    perplexity_pytorch: float  # the checkpoint in PyTorch
    kl_mean: float  # KL(checkpoint || file), nats per position
    kl_p99: float
    top1_agreement: float


@dataclass
class Exported:
    path: Path
    task: str
    nbits_layers: int  # linears as MatMulNBits
    float_layers: (
        int  # linears as float MatMul (unquantized, ignored, or no exact MatMulNBits form); the output layer aside
    )
    accuracy_level: int
    lm_head_bits: int | None
    act_int8: bool
    check: Check
    notes: list[str]
    embed_bits: int | None = None  # the input embedding stored quantized (GatherBlockQuantized)
    head_accuracy_level: int | None = None  # the quantized output layer's own MatMulNBits level, when it differs
    quality: list[Quality] = dataclasses.field(default_factory=list)  # decoders: held-out pages, licenses
    eight_bit_level: int | None = None  # mixed precision: the 8-bit linears' own level, when it differs
    act_zero_point: bool = False  # act_int8 with a zero point per token (w8a8-asym)
    refined_rows: int = 0  # a 4-bit table's most used rows with their rounding error rounded again


def exact_reference(loaded: Loaded, stored: dict[str, stored_mod.StoredLinear], act: str | None = None) -> None:
    """Put the stored grids' values, de-quantized in float32, into the loaded model: the
    PyTorch side of every check then runs on exactly the weights the export carries (and,
    for w8a8, on inputs rounded to int8 per token, as the checkpoint's scheme says)."""
    for name, w in stored.items():
        module = loaded.model.get_submodule(name)
        module.weight.data = w.dequantized()
        if act is not None:
            module.register_forward_pre_hook(lambda _m, args: (_tokens(args[0], act), *args[1:]))


def _tokens(x: torch.Tensor, act: str) -> torch.Tensor:
    return fake_quantize_tokens(x.reshape(-1, x.shape[-1]).float(), act).reshape(x.shape).to(x.dtype)


def int8_activations(ckpt: Path) -> str | None:
    """How the checkpoint rounds its quantized linears' inputs per token when it rounds them to int8: "int8"
    (w8a8), "int8-asym" (w8a8-asym, a zero point per token); None otherwise."""
    act = stored_mod.activation_kind(stored_mod.quantization_config(ckpt))
    return act if act in INT8_ACTIVATIONS else None


def build(loaded: Loaded, stored: dict, opts: onnx_decoder.Options, head=None, table=None) -> onnx.ModelProto:
    if loaded.task == "causal-lm":
        return onnx_decoder.build(loaded.model, stored, opts, head, table)
    return onnx_encoder.build(loaded.model, stored, opts)


def write(model: onnx.ModelProto, dest: Path) -> None:
    big = sum(t.ByteSize() for t in model.graph.initializer) > INLINE_LIMIT
    onnx.save(model, str(dest / MODEL_FILE), save_as_external_data=big, location=f"{MODEL_FILE}.data" if big else None)


def export(loaded: Loaded, dest: Path, opts: onnx_decoder.Options, threads: int) -> Exported:
    """Write DIR/model.onnx with the tokenizer and config beside it, then check it."""
    if (opts.lm_head_bits or opts.embed_bits) and loaded.task != "causal-lm":
        raise UsageError("--lm-head-bits and --embed-bits apply to decoders; this model is an encoder")
    if loaded.task == "causal-lm":
        onnx_decoder.check_supported(loaded.model.config)  # before its stored layers are looked up by name
    stored = stored_mod.read(loaded.checkpoint)
    act = int8_activations(loaded.checkpoint)
    opts = dataclasses.replace(opts, act_int8=act is not None, act_zero_point=act == "int8-asym")
    exact_reference(loaded, stored, act)
    tied = loaded.task == "causal-lm" and widths.tied(loaded.model)
    if loaded.task == "causal-lm":
        opts = table_widths(opts, any(w.kind == "int" for w in stored.values()), tied)
    table = head = hessian = refined = None
    four_bit = 4 in (opts.lm_head_bits, opts.embed_bits)
    if opts.refined_rows and not four_bit:
        raise UsageError(
            "--refined-rows applies to a 4-bit embedding or output layer (--embed-bits 4, --lm-head-bits 4)"
        )
    n_refined = (tables.REFINED_ROWS if opts.refined_rows is None else opts.refined_rows) if four_bit else 0
    gptq_head = opts.lm_head_bits == 4 or (tied and opts.embed_bits == 4)  # a 4-bit output layer: GPTQ, not RTN
    if gptq_head or n_refined:  # both ask for a decoder (checked above)
        calib = tables.output_calibration(loaded.model, loaded.tokenizer, use=n_refined > 0)
        hessian = calib.hessian if gptq_head else None
        refined = tables.most_used(calib.use, n_refined) if n_refined else None
    opts = dataclasses.replace(opts, refined_rows=len(refined) if refined is not None else 0)
    if opts.embed_bits:
        embedding = loaded.model.get_input_embeddings().weight
        table = onnx_decoder.quantized_table(
            embedding, opts.embed_bits, "--embed-bits", hessian if tied else None, refined
        )
    if table is not None and tied:  # one tensor in the model: one table in the file
        if opts.lm_head_bits not in (None, opts.embed_bits):
            raise UsageError(
                f"this model ties its output layer to the embedding: --lm-head-bits {opts.lm_head_bits} and "
                f"--embed-bits {opts.embed_bits} would store it twice; give one width"
            )
        opts, head = dataclasses.replace(opts, lm_head_bits=opts.embed_bits), table
    elif opts.lm_head_bits:
        head = onnx_decoder.quantized_output_layer(loaded.model, opts.lm_head_bits, hessian, refined)
    opts = onnx_decoder.resolved(opts, stored)  # after the output layer's width is known
    graph = build(loaded, stored, opts, head, table)
    decoder = loaded.task == "causal-lm"
    model = loaded.model
    as_stored = (model.get_input_embeddings().weight, model.get_output_embeddings().weight) if decoder else ()
    # the reference multiplies by the same rounded tables (an untied output layer becomes its own tensor)
    if table is not None:
        embed = torch.nn.Parameter(torch.from_numpy(dequantize_nbits(table)), requires_grad=False)
        loaded.model.get_input_embeddings().weight = embed
        if head is table:
            loaded.model.get_output_embeddings().weight = embed
    if head is not None and head is not table:
        loaded.model.get_output_embeddings().weight = torch.nn.Parameter(
            torch.from_numpy(dequantize_nbits(head)), requires_grad=False
        )
    nbits = sum(1 for n in graph.graph.node if n.op_type == "MatMulNBits")
    dense = sum(1 for n in graph.graph.node if n.op_type == "MatMul")  # a float output layer is a Gemm, not counted
    write(graph, dest)
    del graph
    for f in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "chat_template.jinja",
    ):
        if (loaded.checkpoint / f).is_file():
            shutil.copy2(loaded.checkpoint / f, dest / f)
    notes = []
    if loaded.task == "causal-lm":
        onnx_genai.write(dest, loaded.model.config, loaded.checkpoint, MODEL_FILE)
    fp8 = [n for n, w in stored.items() if w.kind == "float"]
    if fp8:
        notes.append(
            f"{len(fp8)} fp8 linears: ONNX Runtime has no fp8 CPU matmul, written de-quantized as float32 (no size or "
            f"speed gain)"
        )
    unsupported = sorted({w.bits for w in stored.values() if w.kind == "int" and w.bits not in NBITS})
    if unsupported:
        notes.append(
            f"{sum(w.bits in unsupported for w in stored.values())} int{'/int'.join(map(str, unsupported))} linears: "
            f"ONNX Runtime's MatMulNBits takes {', '.join(map(str, NBITS))} bits, so they are written de-quantized as "
            "float32 (no size or speed gain)"
        )
    other = [n for n, w in stored.items() if w.kind == "int" and w.bits in NBITS and nbits_block_of(w) is None]
    if other:
        notes.append(
            f"{len(other)} quantized linears have no exact MatMulNBits form (no power-of-two block divides their "
            f"groups): float32"
        )
    if opts.act_int8:
        notes.append(
            "w8a8: each quantized linear's input is rounded to int8 per token in the graph"
            + (" (with a zero point)" if opts.act_zero_point else "")
            + ", as the checkpoint's scheme does"
        )
    if opts.accuracy_level == 4 and nbits:
        notes.append(
            "accuracy_level 4: MatMulNBits quantizes activations to int8 per block inside the kernel (faster, not "
            "bit-exact to the checkpoint)"
        )
    if opts.eight_bit_level == 4 and nbits:
        notes.append(
            "8-bit linears beside lower widths (mixed precision) run at accuracy_level 4: int8 activations per block "
            "inside the kernel (faster, not bit-exact to the checkpoint)"
        )
    chk = check(loaded, dest / MODEL_FILE, threads)
    if loaded.task == "causal-lm" and chk.genai_greedy_equal is None:
        notes.append(f"{onnx_genai.FILE} written for ONNX Runtime GenAI; onnxruntime-genai is not installed, not run")
    elif loaded.task == "causal-lm" and chk.genai_greedy_equal < CHECK_NEW_TOKENS:
        notes.append(
            f"ONNX Runtime GenAI's greedy tokens from this directory follow our own loop's for "
            f"{chk.genai_greedy_equal} of {CHECK_NEW_TOKENS}"
        )
    if opts.head_accuracy_level is not None:
        notes.append(
            f"output layer: {opts.lm_head_bits}-bit MatMulNBits at accuracy_level {opts.head_accuracy_level} (int8 "
            "activations inside the kernel: ONNX Runtime's 8-bit float32 path is slow), the rest at "
            f"{opts.accuracy_level}"
        )
    if table is not None:
        shared = " and shared with the tied output layer (stored once)" if head is table else ""
        how = "by GPTQ on the output layer's inputs" if hessian is not None and head is table else "rounded to nearest"
        zeros = ", a zero point each" if table.zero_points is not None else ""
        notes.append(
            f"input embedding {how} on {opts.embed_bits} bits (blocks of {table.block}{zeros}), read by "
            f"GatherBlockQuantized{shared}"
        )
    if hessian is not None and head is not table:
        notes.append(
            f"output layer: {opts.lm_head_bits} bits by GPTQ on its inputs ({tables.CALIBRATION_TOKENS} tokens of the "
            "built-in calibration pages)"
        )
    if opts.refined_rows:
        notes.append(
            f"the 4-bit table's {opts.refined_rows} rows of the tokens most read or predicted on the calibration pages "
            "refined: their rounding error rounded again on 4 bits and added back"
        )
    exp = Exported(
        dest, loaded.task, nbits, dense, opts.accuracy_level, opts.lm_head_bits, opts.act_int8, chk, notes,
        opts.embed_bits, opts.head_accuracy_level, eight_bit_level=opts.eight_bit_level,
        act_zero_point=opts.act_zero_point, refined_rows=opts.refined_rows,
    )  # fmt: skip
    _verify(exp)
    if loaded.task == "causal-lm":
        loaded.model.get_input_embeddings().weight, loaded.model.get_output_embeddings().weight = as_stored
        exp.quality = quality(loaded, dest / MODEL_FILE, threads)
    (dest / "export.json").write_text(json.dumps(as_dict(exp), indent=2) + "\n")
    return exp


def table_widths(opts: onnx_decoder.Options, quantized: bool, tied: bool) -> onnx_decoder.Options:
    head, embed = widths.table_widths(opts.lm_head_bits, opts.embed_bits, quantized, tied)
    return dataclasses.replace(opts, lm_head_bits=head, embed_bits=embed)


def _verify(exp: Exported) -> None:
    """An export that runs but computes something else is an error, not a file."""
    c = exp.check
    exact = (exp.accuracy_level in (0, 1) or exp.nbits_layers == 0) and not exp.act_int8
    exact = exact and exp.head_accuracy_level in (None, 0, 1) and exp.eight_bit_level in (None, 0, 1)
    if exact and c.max_abs_logit_diff > 1e-3 * max(c.logit_scale, 1.0) * 10:
        raise CompressError(
            f"export check failed: logits differ from PyTorch by {c.max_abs_logit_diff:.3g} (scale {c.logit_scale:.3g})"
        )
    # Rounding activations to int8 per token (w8a8) turns float noise at rounding boundaries into
    # whole steps; with outlier channels (SmolLM2) single predictions flip though perplexity
    # matches (benchmarks/export.py), so the bar there only catches a broken graph.
    floor = 0.99 if exact else 0.7 if exp.act_int8 else 0.8
    if c.top1_agreement is not None and c.top1_agreement < floor:
        raise CompressError(f"export check failed: only {c.top1_agreement:.0%} of next-token predictions match PyTorch")
    if c.min_cosine is not None and c.min_cosine < (0.9999 if exact else 0.99):
        raise CompressError(
            f"export check failed: hidden states differ from PyTorch (lowest cosine {c.min_cosine:.5f})"
        )


def check(loaded: Loaded, path: Path, threads: int) -> Check:
    ids = windows(loaded.tokenizer, textdata.builtin("evaluation").texts, CHECK_TOKENS, CHECK_TOKENS)
    if len(ids) == 0:
        raise CompressError("export check: the built-in text is shorter than one check window")
    ids = ids[:1]  # [1, T]
    sess = ort.session(path, threads)
    if loaded.task == "causal-lm":
        dec = ort.OrtDecoder(sess)
        got, _ = dec.forward(ids.numpy())
        with torch.no_grad():
            ref = loaded.model(ids).logits.float().numpy()
            want = loaded.model.generate(
                ids, max_new_tokens=CHECK_NEW_TOKENS, min_new_tokens=CHECK_NEW_TOKENS, do_sample=False
            )
        greedy = generate(dec, ids.numpy(), CHECK_NEW_TOKENS)[0]
        want = want[0, ids.shape[1] :].numpy()
        genai = None
        if onnx_genai.available():
            genai = _leading_equal(onnx_genai.greedy(path.parent, ids[0].numpy(), CHECK_NEW_TOKENS), greedy)
        return Check(
            ids.shape[1],
            float(np.abs(got - ref).max()),
            float(np.abs(ref).max()),
            top1_agreement=float((got.argmax(-1) == ref.argmax(-1)).mean()),
            greedy_equal=_leading_equal(greedy, want),
            greedy_of=CHECK_NEW_TOKENS,
            genai_greedy_equal=genai,
        )
    feed = onnx_encoder.feed(sess, ids.numpy())
    got = sess.run(["last_hidden_state"], feed)[0]
    with torch.no_grad():
        ref = loaded.model(input_ids=ids).last_hidden_state.float().numpy()
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    return Check(ids.shape[1], float(np.abs(got - ref).max()), float(np.abs(ref).max()), min_cosine=float(cos.min()))


def quality(loaded: Loaded, path: Path, threads: int) -> list[Quality]:
    """The file against the checkpoint in PyTorch on the first QUALITY_TOKENS of each built-in evaluation text."""
    dec = ort.OrtDecoder(ort.session(path, threads))
    seq = min(QUALITY_WINDOW, int(getattr(loaded.model.config, "max_position_embeddings", QUALITY_WINDOW)))
    rows = []
    for name, texts in (("built-in", textdata.builtin("evaluation")), (textdata.LICENSES_NAME, textdata.licenses())):
        ids = windows(loaded.tokenizer, texts.texts, seq, QUALITY_TOKENS)  # [N, seq]
        if len(ids) == 0:
            continue
        nll = torch.zeros(2, dtype=torch.float64)
        kls, same = [], []
        for w in ids:
            got = torch.from_numpy(dec.forward(w[None].numpy())[0][0, :-1])  # [seq-1, V]
            with torch.no_grad():
                ref = loaded.model(w[None]).logits[0, :-1].float()
            for i, logits in enumerate((got, ref)):
                nll[i] -= torch.log_softmax(logits, -1).gather(-1, w[1:, None]).sum().double()
            kl, agree = kl_top1(ref, got)
            kls.append(kl.double())
            same.append(agree)
        kl, n = torch.cat(kls), len(ids) * (seq - 1)
        ppl = torch.exp(nll / n)
        rows.append(
            Quality(
                name,
                n,
                float(ppl[0]),
                float(ppl[1]),
                float(kl.mean()),
                float(torch.quantile(kl, 0.99)),
                float(torch.cat(same).float().mean()),
            )  # fmt: skip
        )
    return rows


def _leading_equal(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    return int(np.argmin(np.append(a[:n] == b[:n], False)))


def as_dict(exp: Exported) -> dict:
    d = asdict(exp)
    d["path"] = str(exp.path)
    return d
