"""`compress prune MODEL -o OUT --method magnitude|wanda|sparsegpt|structured`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compress.cli.common import execute
from compress.errors import UsageError
from compress.recipe import EvalSpec, validate


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
    model: Annotated[str, typer.Argument(help="HF directory, .gguf file, hub id, or built-in: smollm2-135m, minilm-l6")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write (must not exist unless --overwrite)")],
    method: Annotated[str, typer.Option(help="magnitude | wanda | sparsegpt | structured")] = "sparsegpt",
    sparsity: Annotated[float, typer.Option(help="Share of weights set to zero, 0..1 (unstructured pattern)")] = 0.5,
    pattern: Annotated[str, typer.Option(help="unstructured, or N:M (N kept of every M inputs): 2:4, 4:8")] = "unstructured",
    storage: Annotated[str, typer.Option(help="dense (plain transformers loads it) | sparse (bitmask + values: smaller, read by compress)")] = "dense",
    drop_layers: Annotated[Optional[str], typer.Option(help="structured: how many decoder layers to drop (by importance), or which: 3,5,7")] = None,
    mlp_keep: Annotated[Optional[float], typer.Option(help="structured: share of MLP channels to keep")] = None,
    heads_keep: Annotated[Optional[str], typer.Option(help="structured: share of query heads to keep, e.g. 0.5 or 2/3 (whole heads per key/value group)")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Layer name (or 're:REGEX') to keep dense; repeatable")] = None,
    dataset: Annotated[str, typer.Option(help="Calibration text: 'builtin', a .txt/.jsonl/.parquet path or folder, or a hub dataset")] = "builtin",
    text_column: Annotated[str, typer.Option(help="Column holding the text in .jsonl/.parquet/hub datasets")] = "text",
    samples: Annotated[int, typer.Option(help="Calibration samples")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sample")] = 512,
    dampening: Annotated[float, typer.Option(help="SparseGPT: dampening, a fraction of the Hessian's mean diagonal")] = 0.01,
    block_size: Annotated[int, typer.Option(help="SparseGPT: columns per lazy update and mask selection")] = 128,
    dtype: Annotated[str, typer.Option(help="auto | bfloat16 | float16 | float32")] = "auto",
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    eval_dataset: Annotated[str, typer.Option(help="Evaluation text: 'builtin', a .txt/.jsonl/.parquet path, or a hub dataset")] = "builtin",
    eval_tokens: Annotated[int, typer.Option(help="Tokens scored for perplexity")] = 8192,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Measure base and result")] = True,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Measure prefill and decode speed")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Run Python code shipped with the model (unsafe)")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Load pickled .bin weights (unsafe)")] = False,
    save_recipe: Annotated[Optional[Path], typer.Option(help="Also write the equivalent recipe YAML here")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
) -> None:
    """Prune weights (unstructured or N:M, stored dense or sparse) or whole layers, channels and heads."""
    stage = {"stage": "prune", "method": method, "sparsity": sparsity, "pattern": pattern, "storage": storage,
             "drop_layers": _layers(drop_layers), "mlp_keep": mlp_keep, "heads_keep": _fraction(heads_keep), "ignore": ignore or [],
             "dataset": dataset, "text_column": text_column, "samples": samples, "seq_len": seq_len,
             "dampening": dampening, "block_size": block_size}
    recipe = validate({
        "model": model, "output": str(output), "overwrite": overwrite, "dtype": dtype, "device": device,
        "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle, "stages": [stage],
        "evaluate": EvalSpec(enabled=evaluate, dataset=eval_dataset, text_column=text_column, max_tokens=eval_tokens, latency=latency).model_dump(),
    }, "options")
    execute(recipe, save_recipe, json)
