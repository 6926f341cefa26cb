"""`compress quantize MODEL -o OUT --scheme SCHEME`."""

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
    parse_group_size,
)
from compress.errors import UsageError
from compress.quant.schemes import MIXED_WIDTHS, SCHEMES
from compress.quant.table import METHODS
from compress.recipe import EvalSpec, QuantizeStage, Recipe

_eval = partial(default, EvalSpec)  # the recipe's defaults, written once there
_run = partial(default, Recipe)  # the recipe's defaults, written once there
_stage = partial(default, QuantizeStage)  # the recipe's defaults, written once there


def parse_widths(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--bit-widths takes comma-separated integers, e.g. 3,4,5,8; got {text!r}") from None


@method_options(METHODS)
def quantize(
    model: Model,
    output: Output,
    scheme: Annotated[str, typer.Option(help=" | ".join(SCHEMES))] = "w4a16",
    group_size: Annotated[
        Optional[str], typer.Option(help="Weights per scale: 32, 64, 128 (w4a16 default), 'channel' or 'auto'")
    ] = _stage("group_size"),
    symmetric: Annotated[
        Optional[bool],
        typer.Option("--symmetric/--no-symmetric", help="Symmetric weight grid (zero point 0); default: the scheme's"),
    ] = None,
    ignore: Annotated[
        Optional[list[str]], typer.Option(help="Layer name (or 're:REGEX') to keep unquantized; repeatable")
    ] = None,
    method: Annotated[Optional[str], typer.Option(help=method_help(METHODS) + "; default: the scheme's")] = None,
    target_bits: Annotated[
        Optional[float],
        typer.Option(
            help="Mixed precision: average stored bits a weight (scales included) over the decoder's linears, each "
            "linear given one of --bit-widths by its measured cost; group size and symmetry: --scheme's"
        ),
    ] = _stage("target_bits"),
    bit_widths: Annotated[str, typer.Option(help="Widths --target-bits chooses from, comma-separated")] = ",".join(
        map(str, MIXED_WIDTHS)
    ),
    dataset: Dataset = _stage("dataset"),
    text_column: TextColumn = _stage("text_column"),
    samples: Samples = _stage("samples"),
    seq_len: SeqLen = _stage("seq_len"),
    range_search: Annotated[
        bool,
        typer.Option(
            "--range-search/--no-range-search", help="Pick each group's range for least weight error (else min/max)"
        ),
    ] = _stage("range_search"),
    dtype: Annotated[
        str, typer.Option(help="dtype of the layers left unquantized: auto | bfloat16 | float16 | float32")
    ] = _run("dtype"),
    device: Device = _run("device"),
    offload: Annotated[
        bool,
        typer.Option(
            help="Keep decoder layers on disk: read one at a time, write each once quantized (models larger than "
            "memory)"
        ),
    ] = _run("offload"),
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
    """Quantize weights (and activations, for w8a8 and fp8) into a compressed-tensors checkpoint."""
    stage = {
        "stage": "quantize",
        "scheme": scheme,
        "method": method,
        "group_size": parse_group_size(group_size),
        "symmetric": symmetric,
        "range_search": range_search,
        "ignore": ignore or [],
        "target_bits": target_bits,
        "bit_widths": parse_widths(bit_widths),
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
        offload=offload,
    )
    execute(recipe, save_recipe, json)
