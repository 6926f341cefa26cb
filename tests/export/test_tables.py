"""4-bit output layers by GPTQ on the output layer's inputs (export/tables.py)."""

import torch

from compress.export import onnx_decoder, tables
from compress.export.onnx_graph import dequantize_nbits


def test_gptq_table_has_less_output_error_than_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    w = torch.randn(512, 64, generator=g)
    h = x.T @ x / len(x)
    errors = {}
    for name, hessian in (("rtn", None), ("gptq", h)):
        table = torch.from_numpy(dequantize_nbits(onnx_decoder.quantized_table(w, 4, "--lm-head-bits", hessian)))
        errors[name] = float(((x @ (w - table).T) ** 2).mean())
    assert errors["gptq"] < 0.7 * errors["rtn"], errors


def test_output_hessian_reads_the_output_layer_inputs(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    h = tables.output_hessian(model, AutoTokenizer.from_pretrained(src))
    k = model.config.hidden_size
    assert h.shape == (k, k) and torch.allclose(h, h.T, atol=1e-5)
    assert float(torch.linalg.eigvalsh(h.double()).min()) > -1e-4 and float(h.diagonal().min()) > 0
