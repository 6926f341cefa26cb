"""`compress prune MODEL -o OUT --method magnitude|wanda|sparsegpt|structured`."""

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
)
from compress.prune.table import METHODS


@method_options(METHODS)
def prune(
    model: Model,
    output: Output,
    method: Annotated[str, typer.Option(help=method_help(METHODS))] = "sparsegpt",
    sparsity: Annotated[float, typer.Option(help="Share of weights set to zero, 0..1 (unstructured pattern)")] = 0.5,
    pattern: Annotated[
        str, typer.Option(help="unstructured, or N:M (N kept of every M inputs): 2:4, 4:8")
    ] = "unstructured",
    storage: Annotated[
        str,
        typer.Option(help="dense (plain transformers loads it) | sparse (bitmask + values: smaller, read by compress)"),
    ] = "dense",
    ignore: Annotated[
        Optional[list[str]], typer.Option(help="Layer name (or 're:REGEX') to keep dense; repeatable")
    ] = None,
    dataset: Dataset = "builtin",
    text_column: TextColumn = "text",
    samples: Samples = 64,
    seq_len: SeqLen = 512,
    dtype: Annotated[str, typer.Option(help="auto | bfloat16 | float16 | float32")] = "auto",
    device: Device = "cpu",
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
    """Prune weights (unstructured or N:M, stored dense or sparse) or whole layers, channels and heads."""
    stage = {
        "stage": "prune",
        "method": method,
        "sparsity": sparsity,
        "pattern": pattern,
        "storage": storage,
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
    )
    execute(recipe, save_recipe, json)
