"""`compress prune MODEL -o OUT --method magnitude|wanda|sparsegpt|structured`."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Optional

import typer

from compress.cli.common import (
    AllowPickle,
    Dataset,
    Device,
    EvalAlso,
    EvalDataset,
    EvalTokens,
    Evaluate,
    Json,
    Kl,
    Latency,
    Model,
    Output,
    Overwrite,
    Samples,
    SaveRecipe,
    SeqLen,
    Tasks,
    TextColumn,
    TrustRemoteCode,
    default,
    execute,
    given,
    method_help,
    method_options,
    one_stage,
)
from compress.prune.table import METHODS
from compress.recipe import EvalSpec, PruneStage, Recipe

_eval = partial(default, EvalSpec)  # the recipe's defaults, written once there
_run = partial(default, Recipe)  # the recipe's defaults, written once there
_stage = partial(default, PruneStage)  # the recipe's defaults, written once there


@method_options(METHODS)
def prune(
    model: Model,
    output: Output,
    method: Annotated[str, typer.Option(help=method_help(METHODS))] = "sparsegpt",
    sparsity: Annotated[float, typer.Option(help="Share of weights set to zero, 0..1 (unstructured pattern)")] = _stage(
        "sparsity"
    ),
    pattern: Annotated[str, typer.Option(help="unstructured, or N:M (N kept of every M inputs): 2:4, 4:8")] = default(
        PruneStage, "pattern"
    ),
    storage: Annotated[
        str,
        typer.Option(help="dense (plain transformers loads it) | sparse (bitmask + values: smaller, read by compress)"),
    ] = _stage("storage"),
    ignore: Annotated[
        Optional[list[str]], typer.Option(help="Layer name (or 're:REGEX') to keep dense; repeatable")
    ] = None,
    dataset: Dataset = _stage("dataset"),
    text_column: TextColumn = _stage("text_column"),
    samples: Samples = _stage("samples"),
    seq_len: SeqLen = _stage("seq_len"),
    dtype: Annotated[str, typer.Option(help="auto | bfloat16 | float16 | float32")] = _run("dtype"),
    device: Device = _run("device"),
    eval_dataset: EvalDataset = _eval("dataset"),
    eval_also: EvalAlso = _eval("also"),
    eval_tokens: EvalTokens = _eval("max_tokens"),
    evaluate: Evaluate = _eval("enabled"),
    latency: Latency = _eval("latency"),
    kl: Kl = _eval("kl_divergence"),
    tasks: Tasks = "",
    overwrite: Overwrite = _run("overwrite"),
    trust_remote_code: TrustRemoteCode = _run("trust_remote_code"),
    allow_pickle: AllowPickle = _run("allow_pickle"),
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
        eval_also=eval_also,
        text_column=text_column,
        eval_tokens=eval_tokens,
        latency=latency,
        kl=kl,
        tasks=tasks,
    )
    execute(recipe, save_recipe, json)
