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


def test_output_calibration_reads_the_output_layer_inputs(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    plain = tables.output_calibration(model, tok)
    calib = tables.output_calibration(model, tok, use=True)
    h, k = calib.hessian, model.config.hidden_size
    assert plain.use is None and torch.equal(plain.hessian, h)
    assert h.shape == (k, k) and torch.allclose(h, h.T, atol=1e-5)
    assert float(torch.linalg.eigvalsh(h.double()).min()) > -1e-4 and float(h.diagonal().min()) > 0
    # each position reads one token and predicts a distribution summing to 1
    assert calib.use.shape == (model.config.vocab_size,) and float(calib.use.min()) >= 0
    assert abs(float(calib.use.sum()) - 2 * tables.CALIBRATION_TOKENS) < 1e-3 * tables.CALIBRATION_TOKENS


def test_most_used_rows():
    use = torch.tensor([0.5, 3.0, 0.0, 2.0, 3.0, 1.0])
    assert tables.most_used(use, 3).tolist() == [1, 3, 4]
    assert tables.most_used(use, 100).tolist() == list(range(6))
