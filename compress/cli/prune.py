"""`compress prune MODEL -o OUT --method magnitude|wanda|sparsegpt|structured`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from compress.cli.common import (
    AllowPickle, Dataset, Device, EvalDataset, EvalTokens, Evaluate, Json, Latency, Model, Output, Overwrite, Samples,
    SaveRecipe, SeqLen, TextColumn, TrustRemoteCode, execute, one_stage,
)
from compress.errors import UsageError


def _layers(value: str | None) -> int | list[int] | None:
    """'6' -> 6 layers chosen by importance; '3,5,7' -> those layers."""
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",")] if "," in value else int(value)
    except ValueError:
        raise UsageError(f"--drop-layers takes a count (6) or a list of layer indices (3,5,7), got {value!r}") from None


def _fraction(value: str | None) -> float | None:
    """'0.5' or '2/3' -> float."""
    if value is None:
        return None
    try:
        num, _, den = value.partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--heads-keep takes a share such as 0.5 or 2/3, got {value!r}") from None


def prune(
    model: Model,
    output: Output,
    method: Annotated[str, typer.Option(help="magnitude | wanda | sparsegpt | structured")] = "sparsegpt",
    sparsity: Annotated[float, typer.Option(help="Share of weights set to zero, 0..1 (unstructured pattern)")] = 0.5,
    pattern: Annotated[str, typer.Option(help="unstructured, or N:M (N kept of every M inputs): 2:4, 4:8")] = "unstructured",
    storage: Annotated[str, typer.Option(help="dense (plain transformers loads it) | sparse (bitmask + values: smaller, read by compress)")] = "dense",
    drop_layers: Annotated[Optional[str], typer.Option(help="structured: how many decoder layers to drop (by importance), or which: 3,5,7")] = None,
    mlp_keep: Annotated[Optional[float], typer.Option(help="structured: share of MLP channels to keep")] = None,
    heads_keep: Annotated[Optional[str], typer.Option(help="structured: share of query heads to keep, e.g. 0.5 or 2/3 (whole heads per key/value group)")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Layer name (or 're:REGEX') to keep dense; repeatable")] = None,
    dataset: Dataset = "builtin",
    text_column: TextColumn = "text",
    samples: Samples = 64,
    seq_len: SeqLen = 512,
    dampening: Annotated[float, typer.Option(help="SparseGPT: dampening, a fraction of the Hessian's mean diagonal")] = 0.01,
    block_size: Annotated[int, typer.Option(help="SparseGPT: columns per lazy update and mask selection")] = 128,
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
) -> None:
    """Prune weights (unstructured or N:M, stored dense or sparse) or whole layers, channels and heads."""
    stage = {"stage": "prune", "method": method, "sparsity": sparsity, "pattern": pattern, "storage": storage,
             "drop_layers": _layers(drop_layers), "mlp_keep": mlp_keep, "heads_keep": _fraction(heads_keep), "ignore": ignore or [],
             "dataset": dataset, "text_column": text_column, "samples": samples, "seq_len": seq_len,
             "dampening": dampening, "block_size": block_size}
    recipe = one_stage(stage, model=model, output=output, overwrite=overwrite, dtype=dtype, device=device,
                       trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, evaluate=evaluate,
                       eval_dataset=eval_dataset, text_column=text_column, eval_tokens=eval_tokens, latency=latency)
    execute(recipe, save_recipe, json)
