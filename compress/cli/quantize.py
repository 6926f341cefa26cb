"""`compress quantize MODEL -o OUT --scheme SCHEME`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from compress.cli.common import (
    AllowPickle, Dataset, Device, EvalDataset, EvalTokens, Evaluate, Json, Latency, Model, Output, Overwrite, Samples,
    SaveRecipe, SeqLen, TextColumn, TrustRemoteCode, execute, one_stage, parse_group_size,
)


def quantize(
    model: Model,
    output: Output,
    scheme: Annotated[str, typer.Option(help="w4a16 | w8a16 | w8a8 | fp8")] = "w4a16",
    group_size: Annotated[Optional[str], typer.Option(help="Weights per scale: 32, 64, 128 (w4a16 default), 'channel' or 'auto'")] = None,
    symmetric: Annotated[bool, typer.Option("--symmetric/--no-symmetric", help="Symmetric weight grid (zero point 0)")] = True,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Layer name (or 're:REGEX') to keep unquantized; repeatable")] = None,
    method: Annotated[str, typer.Option(help="rtn | gptq | awq | smoothquant+gptq | smoothquant+rtn")] = "rtn",
    dataset: Dataset = "builtin",
    text_column: TextColumn = "text",
    samples: Samples = 64,
    seq_len: SeqLen = 512,
    dampening: Annotated[float, typer.Option(help="GPTQ: dampening, a fraction of the Hessian's mean diagonal")] = 0.01,
    block_size: Annotated[int, typer.Option(help="GPTQ: columns per lazy update")] = 128,
    actorder: Annotated[bool, typer.Option("--actorder/--no-actorder", help="GPTQ: quantize columns by decreasing activation energy")] = False,
    awq_grid: Annotated[int, typer.Option(help="AWQ: scale candidates to search")] = 20,
    alpha: Annotated[Optional[float], typer.Option(help="SmoothQuant: migration strength 0..1 (default: searched per layer)")] = None,
    range_search: Annotated[bool, typer.Option("--range-search/--no-range-search", help="Pick each group's range for least weight error (else min/max)")] = True,
    dtype: Annotated[str, typer.Option(help="dtype of the layers left unquantized: auto | bfloat16 | float16 | float32")] = "auto",
    device: Device = "cpu",
    offload: Annotated[bool, typer.Option(help="Keep decoder layers on disk: read one at a time, write each once quantized (models larger than memory)")] = False,
    eval_dataset: EvalDataset = "builtin",
    eval_tokens: EvalTokens = 8192,
    evaluate: Evaluate = True,
    latency: Latency = True,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    save_recipe: SaveRecipe = None,
    json: Json = False,
) -> None:
    """Quantize weights (and activations, for w8a8 and fp8) into a compressed-tensors checkpoint."""
    stage = {"stage": "quantize", "scheme": scheme, "method": method, "group_size": parse_group_size(group_size),
             "symmetric": symmetric, "range_search": range_search, "ignore": ignore or [],
             "dataset": dataset, "text_column": text_column, "samples": samples, "seq_len": seq_len,
             "dampening": dampening, "block_size": block_size, "actorder": actorder, "awq_grid": awq_grid, "alpha": alpha}
    recipe = one_stage(stage, model=model, output=output, overwrite=overwrite, dtype=dtype, device=device,
                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, evaluate=evaluate,
                       eval_dataset=eval_dataset, text_column=text_column, eval_tokens=eval_tokens, latency=latency, offload=offload)
    execute(recipe, save_recipe, json)
