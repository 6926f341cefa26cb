"""`compress export MODEL --format onnx|gguf [-o DIR]`: a checkpoint for ONNX Runtime or llama.cpp."""

from __future__ import annotations

import json as jsonlib
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from compress.cli.common import AllowPickle, Json, Overwrite, err, out
from compress.errors import UsageError
from compress.export.tables import REFINED_ROWS
from compress.formats.atomic import atomic_dir, check_output
from compress.models import load as loading, source as sources


def export(
    model: Annotated[
        str, typer.Argument(help="Checkpoint written by compress (or any HF checkpoint / built-in alias)")
    ],
    format: Annotated[str, typer.Option("--format", "-f", help="onnx | gguf")] = "onnx",
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Directory to write (default: MODEL-onnx / MODEL-gguf)")
    ] = None,
    accuracy_level: Annotated[
        Optional[int],
        typer.Option(
            help="ONNX MatMulNBits: 0 = float32 math on our exact weights, 4 = int8 activations inside the kernel "
            "(faster, not exact). Default: 0 for 4-bit, 4 for 8-bit "
            "(ONNX Runtime's 8-bit float path is slower than float32)"
        ),
    ] = None,
    lm_head_bits: Annotated[
        Optional[int],
        typer.Option(
            help="The output layer on 8 bits (rounded to nearest, blocks of 32; GGUF Q8_0) or 4 (by GPTQ; ONNX: a "
            "zero point per block of 16, GGUF: Q4_0), or 0 for float. Default: 8 when the checkpoint has integer "
            "weights (ONNX: faster, +0.06% perplexity on SmolLM2), "
            "else float"
        ),
    ] = None,
    embed_bits: Annotated[
        Optional[int],
        typer.Option(
            help="The input embedding stored quantized on 8 bits (blocks of 32) or 4 (a zero point per block of 16), "
            "or 0 for float; a tied output layer shares it (default: the output layer's width when tied, else float)"
        ),
    ] = None,
    refined_rows: Annotated[
        Optional[int],
        typer.Option(
            help="ONNX, a 4-bit embedding or output layer: the rows of this many tokens (those most read or "
            f"predicted on the calibration pages) get their rounding error rounded again and added back. Default "
            f"{REFINED_ROWS} (on SmolLM2 3.1 MB, the 4-bit table's cost from +1.6% / +2.1% perplexity to +0.25% / "
            "+1.2% on held-out pages / license texts: RESULTS.md); 0: none"
        ),
    ] = None,
    k_quants: Annotated[
        bool,
        typer.Option(
            help="GGUF: where rows are multiples of 256, int4/int5 with zero points become Q4_K/Q5_K (0.5 bits a "
            "weight smaller than Q4_1/Q5_1) and symmetric int3/int6 in groups of 16 Q3_K/Q6_K: our integers, their "
            "scales rounded to the k-quant's codes (error reported); --no-k-quants keeps the exact 32-blocks"
        ),
    ] = True,
    threads: Annotated[int, typer.Option(help="Threads for the export's check run")] = 0,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    json: Json = False,
) -> None:
    """Export for CPU/edge runtimes, carrying the quantized integers over, and check the result."""
    # onnx and onnxruntime take about a second to import: only the commands that use them load them.
    from compress.export import gguf_export, onnx_decoder, onnx_export

    if format not in ("onnx", "gguf"):
        raise UsageError(f"--format must be onnx or gguf, got {format!r}")
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise UsageError(f"--accuracy-level must be 0..4, got {accuracy_level}")
    for option, bits in (("--lm-head-bits", lm_head_bits), ("--embed-bits", embed_bits)):
        if bits not in (None, 0, 4, 8):
            raise UsageError(f"{option} must be 4 or 8 (0: float32), got {bits}")
    if refined_rows is not None and (refined_rows < 0 or format != "onnx"):
        raise UsageError(
            f"--refined-rows takes a count of rows (0: none) and applies to --format onnx, got {refined_rows}"
        )
    if not k_quants and format != "gguf":
        raise UsageError("--no-k-quants applies to --format gguf")
    src = sources.resolve(model, allow_pickle)
    dest = output or Path(f"{src.path.name.removesuffix('.gguf')}-{format}")
    check_output(dest, overwrite, [src.path])
    threads = threads or torch.get_num_threads()
    err.print(f"loading {model} ...")
    loaded = loading.load(src, dtype="float32", allow_pickle=allow_pickle, quantized=True)
    with atomic_dir(dest, overwrite) as tmp:
        err.print(f"exporting to {format} ...")
        if format == "onnx":
            opts = onnx_decoder.Options(accuracy_level, lm_head_bits, embed_bits=embed_bits, refined_rows=refined_rows)
            done = onnx_export.export(loaded, tmp, opts, threads)
            summary = onnx_export.as_dict(done)
        else:
            summary = asdict(gguf_export.export(loaded, tmp, k_quants, lm_head_bits, embed_bits))
        summary["path"] = str(dest)  # where it lands, not the staging directory the export was written in
        (tmp / "export.json").write_text(jsonlib.dumps(summary, indent=2) + "\n")
    if json:
        typer.echo(jsonlib.dumps(summary, indent=2))
        return
    for note in summary.get("notes", []):
        err.print(f"note: {note}")
    out.print(_summary_line(format, summary))
    out.print(f"written to {dest}")


def _summary_line(format: str, s: dict) -> str:
    c = s["check"]
    if format == "gguf":
        return (
            f"GGUF: {s['tensors']} tensors ({s['exact']} carried over"
            + (" exactly" if not s["rounded_scales"] else f", {s['rounded_scales']} block values rounded to float16")
            + f", {s['kquant']} as k-quants, {s['requantized']} re-quantized), {s['file_bytes'] / 1e6:.1f} MB; "
            f"read back: {c['verdict']}"
        )
    agree = (
        f"next-token agreement {c['top1_agreement']:.1%}, greedy {c['greedy_equal']}/{c['greedy_of']} tokens equal"
        if c["top1_agreement"] is not None
        else f"lowest hidden-state cosine {c['min_cosine']:.6f}"
    )
    if c.get("genai_greedy_equal") is not None:
        agree += f"; ONNX Runtime GenAI greedy {c['genai_greedy_equal']}/{c['greedy_of']} equal"
    quality = "".join(
        f"\n{q['text']}: perplexity {q['perplexity']:.3f} (PyTorch {q['perplexity_pytorch']:.3f}, "
        f"{(q['perplexity'] / q['perplexity_pytorch'] - 1) * 100:+.2f}%), KL {q['kl_mean']:.4f}, top-1 "
        f"{q['top1_agreement']:.1%} on {q['tokens']} tokens"
        for q in s.get("quality", [])
    )
    return (
        f"ONNX: {s['nbits_layers']} MatMulNBits + {s['float_layers']} float matmuls (accuracy_level "
        f"{s['accuracy_level']}); "
        f"check vs PyTorch on {c['tokens']} tokens: max |logit diff| {c['max_abs_logit_diff']:.3g}, {agree}{quality}"
    )
