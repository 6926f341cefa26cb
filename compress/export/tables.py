"""A 4-bit output layer (or tied table) chosen by GPTQ on the output layer's inputs, instead of rounded to nearest.

Measured on SmolLM2-135M's tied table alone (symmetric, blocks of 32, the linears float; 16 x 512 tokens of the
built-in calibration pages; perplexity change on 4,096 tokens of held-out pages / license texts): round to nearest
+14.7% / +17.5%, range searched for least weight error +14.3% / +13.1%, weighted by the inputs' E[x^2] +5.6% / +7.5%,
GPTQ +2.3% / +6.7% (2.8 s). The same table serves the embedding lookup; the numbers above include that. At 8 bits
round to nearest already costs +0.06%, so only 4-bit tables are calibrated.
Measured again later (float32 model, 4,096 tokens of each text): GPTQ symmetric +2.1% / +5.6%; with a zero point per
block +2.5% / +3.6% (better off-domain, worse on the pages the export's check reads, 0.44 MB more); the Hessian from
64 x 512 tokens instead of 16 x 512: +2.2% / +4.9%. So the table stays symmetric on 16 x 512 tokens.
With each block's extreme on -8 (qparams' symmetric grid since 363c2bc; 41% of the scales negative), 8,192 tokens of
each text, old grid against new in one session: +2.08% / +4.80% -> +1.85% / +5.13%.
With refined rows (below) the measure moved to KL, and zero points in blocks of 16 won on both texts (TABLE_GRID).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress.data import text
from compress.data.tokens import windows
from compress.primitives.gptq import gptq
from compress.primitives.qparams import Grid

CALIBRATION_TOKENS = 16 * 512  # of the built-in calibration pages, in windows of 512
# A 4-bit table's rows of the tokens most read or predicted get a second pass: their rounding error rounded again on
# the same grid, added back by the graph (ONNX). `benchmarks/table_rows.py` (SmolLM2-135M's tied table alone, the
# linears float, 4,096 tokens of held-out pages / license texts) measures the choices. On the grid below, KL with no
# refined rows 0.0114 / 0.0435; 512 / 2,048 / 4,096 / 8,192 rows: 0.0056 / 0.0319, 0.0034 / 0.0288, 0.0024 /
# 0.0259, 0.0016 / 0.0214, for about 0.4 MB a 1,024 rows. In the whole w4a16 SmolLM2 export (benchmarks/export.py,
# 8,192 tokens of each text, against the checkpoint): 4,096 rows +0.58% / +1.54% perplexity, 8,192 rows +0.25% /
# +1.19% for 1.5 MB more (78.4 MB: 0.45x the float-table file of before, 175.3 MB). Refined rows cost no decode
# speed measured (RESULTS.md, export section), so 8,192.
REFINED_ROWS = 8192
# A 4-bit table's grid: zero points, blocks of 16, GPTQ dampened 10x its default. Same benchmark, 2,048 refined rows,
# KL on pages / licenses: symmetric, blocks of 32 (the grid before) 0.0070 / 0.0583; symmetric, blocks of 16 0.0047 /
# 0.0403; zero points 0.0041 / 0.0338; dampening 0.1 0.0034 / 0.0288 (0.3: 0.0037 / 0.0311; blocks of 32: 0.0050 /
# 0.0407). A looser fit to the calibration pages' Hessian keeps each row closer to its float values, which the
# embedding lookup reads and other text's hidden states weigh differently. It costs 0.25 bits a weight for the zero
# points and 1 for the smaller blocks' float16 scales (the float32 scales of the grid before cost as much).
TABLE_GRID = (False, 16)  # (symmetric, block)
TABLE_DAMPENING = 0.1


@dataclass
class OutputCalibration:
    hessian: torch.Tensor  # [K, K] float32: mean x x^T of the output layer's inputs (the final norm's outputs)
    use: torch.Tensor | None  # [V]: each token's count among the inputs plus its summed predicted probability


@torch.no_grad()
def output_calibration(model: torch.nn.Module, tokenizer, use: bool = False) -> OutputCalibration:
    """The output layer's input statistics on the calibration text; with `use`, also how much each token is read
    (the embedding's rows) or predicted (the output layer's)."""
    ids = windows(tokenizer, text.builtin("calibration").texts, 512, CALIBRATION_TOKENS)
    head = model.get_output_embeddings()
    v, k = head.weight.shape
    acc = {"H": torch.zeros(k, k, dtype=torch.float64), "n": 0, "use": torch.zeros(v, dtype=torch.float64)}

    def gather(module, args):
        x = args[0].reshape(-1, k)
        acc["H"] += x.double().T @ x.double()
        acc["n"] += x.shape[0]
        if use:
            for rows in x.split(512):  # [512, V] probabilities at a time
                acc["use"] += F.linear(rows, module.weight, module.bias).float().softmax(-1).sum(0).double().cpu()
        raise _Stop  # the model's own logits are not needed

    hook = head.register_forward_pre_hook(gather)
    try:
        for i in range(0, len(ids), 4):
            try:
                model(ids[i : i + 4].to(head.weight.device))
            except _Stop:
                pass
    finally:
        hook.remove()
    hessian = (acc["H"] / max(acc["n"], 1)).float()
    if not use:
        return OutputCalibration(hessian, None)
    counts = torch.bincount(ids.reshape(-1), minlength=v)[:v].double()
    return OutputCalibration(hessian, (acc["use"] + counts).float())


def most_used(use: torch.Tensor, n: int) -> torch.Tensor:
    """[min(n, V)] int64: the rows of the `n` most used tokens, ascending."""
    return use.argsort(descending=True, stable=True)[: min(n, use.numel())].sort().values


class _Stop(Exception):
    pass


def calibrated(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    block: int,
    scale_dtype: torch.dtype = torch.float32,
    symmetric: bool = True,
    **gptq_options,
):
    """(q [N, K] int8, scale [N, K/block], zero point [N, K/block] int8) of the table on a `bits` grid in blocks of
    `block`, by GPTQ (`gptq_options`: its dampening); scales in `scale_dtype` (GGUF's blocks and ONNX tables hold
    float16)."""
    return gptq(weight.detach().float(), hessian, Grid(bits, "int", symmetric, block), scale_dtype, **gptq_options)
