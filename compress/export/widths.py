"""The widths of a decoder's output layer and input embedding in an export, where not asked."""

from __future__ import annotations

import torch


def tied(model: torch.nn.Module) -> bool:
    """The output layer is the input embedding (one tensor)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def table_widths(
    head: int | None, embed: int | None, quantized: bool, tied: bool, untied_embedding: bool = False
) -> tuple[int | None, int | None]:
    """(output layer bits, embedding bits), None for float; asked widths are kept (0 asks for float). A checkpoint with
    integer weights gets an 8-bit output layer, and a tied model the one 8-bit table for both. Measured on SmolLM2-135M
    w4a16 in ONNX Runtime (benchmarks/export.py, 2 threads): file 175 -> 94 MB, decode 3.07x -> 3.49x PyTorch fp32,
    perplexity +0.06%, 16/16 greedy tokens. At 4 bits the output layer alone cost +13.6% rounded to nearest, +2.1% /
    +4.4% (pages / licenses) by GPTQ (export/tables.py): never a default. llama.cpp's own mixes keep these tables at 6
    to 8 bits too. A float checkpoint stays float. untied_embedding: an untied embedding gets 8 bits too (GGUF, as
    llama.cpp's mixes round token_embd; in ONNX a rounded table only saves size)."""
    if tied:  # one tensor, one width, unless both are asked
        head = embed if head is None else head
        embed = head if embed is None else embed
    if head is None and quantized:
        head = 8
    if embed is None and quantized and (tied or untied_embedding):
        embed = head or 8
    return head or None, embed or None
