"""HQQ: a lower l_p error than round to nearest on heavy-tailed weights, integers in range, and a
checkpoint that plain transformers reloads to exactly our de-quantized weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.primitives.qparams import Grid, dequantize, quantize, search_range
from compress.quant.methods.hqq import P, hqq
from tests.cli.test_errors import assert_one_line_error, compress
from tests.formats.test_tiny_models import quantize as quantize_tiny


def lp(w: torch.Tensor, q, s, z) -> float:
    return float((w.float() - dequantize(q, s.float(), z)).abs().pow(P).mean())


@pytest.mark.parametrize(
    "grid,gain",
    [(Grid(4, "int", True, 64), 0.995), (Grid(4, "int", False, 64), 0.995), (Grid(8, "int", True, None), 1.0)],
    ids=["w4-sym", "w4-asym", "w8-channel"],
)
def test_hqq_fits_heavy_tailed_weights_better_than_rtn_under_its_loss(grid, gain):
    w = torch.distributions.StudentT(3).sample((128, 256)).to(torch.bfloat16)  # outliers in most groups
    s, z = search_range(w, grid, torch.bfloat16)
    rtn = lp(w, quantize(w, s, z, grid), s, z)
    q, s, z = hqq(w, grid, torch.bfloat16, iters=20)
    assert lp(w, q, s, z) <= gain * rtn  # measured: 0.3007 vs 0.3093 (w4 sym), 0.2681 vs 0.2720 (w4 asym)
    assert q.dtype == torch.int8 and int(q.min()) >= grid.qmin and int(q.max()) <= grid.qmax
    assert s.dtype == torch.bfloat16 and bool((s != 0).all())
    assert bool((z == 0).all()) if grid.symmetric else int(z.min()) >= grid.qmin and int(z.max()) <= grid.qmax


def test_hqq_checkpoint_reloads_to_our_weights(tiny_model, tmp_path):
    src, out = tiny_model("llama"), tmp_path / "out"
    report = quantize_tiny(src, out, "w4a16", group_size=32, method="hqq", hqq_iters=5, symmetric=True)
    assert report.stages[0].settings["method"] == "hqq" and report.stages[0].settings["hqq_iters"] == 5
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    mine = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    w = base.model.layers[0].mlp.down_proj.weight.to(torch.bfloat16)
    q, s, z = hqq(w, Grid(4, "int", True, 32), torch.bfloat16, iters=5)
    mine(torch.tensor([[1, 2, 3]]))  # transformers de-compresses on the first forward
    assert torch.equal(mine.model.layers[0].mlp.down_proj.weight, dequantize(q, s.float(), z))


def test_hqq_options_are_checked(tiny_model, tmp_path):
    line = assert_one_line_error(
        compress(
            "quantize", tiny_model("llama"), "-o", tmp_path / "o", "--method", "hqq", "--hqq-iters", "0", "--no-eval"
        ),
        2,
    )
    assert "hqq_iters" in line and not (tmp_path / "o").exists()
    line = assert_one_line_error(
        compress(
            "quantize", tiny_model("llama"), "-o", tmp_path / "o", "--method", "gptq", "--hqq-iters", "5", "--no-eval"
        ),
        2,
    )
    assert "belong to method hqq" in line
