"""`compress quantize MODEL -o OUT --scheme SCHEME`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from compress.cli.common import (
    AllowPickle,
    Dataset,
    Device,
    EvalDataset,
    EvalTokens,
    Evaluate,
    Json,
    Latency,
    Model,
    Output,
    Overwrite,
    Samples,
    SaveRecipe,
    SeqLen,
    TextColumn,
    TrustRemoteCode,
    execute,
    given,
    method_help,
    method_options,
    one_stage,
    parse_group_size,
)
from compress.quant.schemes import SCHEMES
from compress.quant.table import METHODS


@method_options(METHODS)
def quantize(
    model: Model,
    output: Output,
    scheme: Annotated[str, typer.Option(help=" | ".join(SCHEMES))] = "w4a16",
    group_size: Annotated[
        Optional[str], typer.Option(help="Weights per scale: 32, 64, 128 (w4a16 default), 'channel' or 'auto'")
    ] = None,
    symmetric: Annotated[
        bool, typer.Option("--symmetric/--no-symmetric", help="Symmetric weight grid (zero point 0)")
    ] = True,
    ignore: Annotated[
        Optional[list[str]], typer.Option(help="Layer name (or 're:REGEX') to keep unquantized; repeatable")
    ] = None,
    method: Annotated[str, typer.Option(help=method_help(METHODS))] = "rtn",
    dataset: Dataset = "builtin",
    text_column: TextColumn = "text",
    samples: Samples = 64,
    seq_len: SeqLen = 512,
    range_search: Annotated[
        bool,
        typer.Option(
            "--range-search/--no-range-search", help="Pick each group's range for least weight error (else min/max)"
        ),
    ] = True,
    dtype: Annotated[
        str, typer.Option(help="dtype of the layers left unquantized: auto | bfloat16 | float16 | float32")
    ] = "auto",
    device: Device = "cpu",
    offload: Annotated[
        bool,
        typer.Option(
            help="Keep decoder layers on disk: read one at a time, write each once quantized (models larger than "
            "memory)"
        ),
    ] = False,
    eval_dataset: EvalDataset = "builtin",
    eval_tokens: EvalTokens = 8192,
    evaluate: Evaluate = True,
    latency: Latency = True,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
    save_recipe: SaveRecipe = None,
    json: Json = False,
    **options,
) -> None:
    """Quantize weights (and activations, for w8a8 and fp8) into a compressed-tensors checkpoint."""
    stage = {
        "stage": "quantize",
        "scheme": scheme,
        "method": method,
        "group_size": parse_group_size(group_size),
        "symmetric": symmetric,
        "range_search": range_search,
        "ignore": ignore or [],
        "dataset": dataset,
        "text_column": text_column,
        "samples": samples,
        "seq_len": seq_len,
        **given(options),
    }
    recipe = one_stage(
        stage,
        model=model,
        output=output,
        overwrite=overwrite,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        evaluate=evaluate,
        eval_dataset=eval_dataset,
        text_column=text_column,
        eval_tokens=eval_tokens,
        latency=latency,
        offload=offload,
    )
    execute(recipe, save_recipe, json)
