"""`compress quantize MODEL -o OUT --scheme SCHEME`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compress.cli.common import execute, parse_group_size
from compress.recipe import EvalSpec, validate


def quantize(
    model: Annotated[str, typer.Argument(help="HF directory, .gguf file, hub id, or built-in: smollm2-135m, minilm-l6")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write (must not exist unless --overwrite)")],
    scheme: Annotated[str, typer.Option(help="w4a16 | w8a16 | w8a8 | fp8")] = "w4a16",
    group_size: Annotated[Optional[str], typer.Option(help="Weights per scale: 32, 64, 128 (w4a16 default), 'channel' or 'auto'")] = None,
    symmetric: Annotated[bool, typer.Option("--symmetric/--no-symmetric", help="Symmetric weight grid (zero point 0)")] = True,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Layer name (or 're:REGEX') to keep unquantized; repeatable")] = None,
    method: Annotated[str, typer.Option(help="rtn | gptq | awq | smoothquant+gptq | smoothquant+rtn")] = "rtn",
    dataset: Annotated[str, typer.Option(help="Calibration text: 'builtin', a .txt/.jsonl/.parquet path or folder, or a hub dataset")] = "builtin",
    text_column: Annotated[str, typer.Option(help="Column holding the text in .jsonl/.parquet/hub datasets")] = "text",
    samples: Annotated[int, typer.Option(help="Calibration samples")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sample")] = 512,
    dampening: Annotated[float, typer.Option(help="GPTQ: dampening, a fraction of the Hessian's mean diagonal")] = 0.01,
    block_size: Annotated[int, typer.Option(help="GPTQ: columns per lazy update")] = 128,
    actorder: Annotated[bool, typer.Option("--actorder/--no-actorder", help="GPTQ: quantize columns by decreasing activation energy")] = False,
    awq_grid: Annotated[int, typer.Option(help="AWQ: scale candidates to search")] = 20,
    alpha: Annotated[Optional[float], typer.Option(help="SmoothQuant: migration strength 0..1 (default: searched per layer)")] = None,
    range_search: Annotated[bool, typer.Option("--range-search/--no-range-search", help="Pick each group's range for least weight error (else min/max)")] = True,
    dtype: Annotated[str, typer.Option(help="dtype of the layers left unquantized: auto | bfloat16 | float16 | float32")] = "auto",
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    offload: Annotated[bool, typer.Option(help="Keep decoder layers on disk: read one at a time, write each once quantized (models larger than memory)")] = False,
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
    """Quantize weights (and activations, for w8a8 and fp8) into a compressed-tensors checkpoint."""
    stage = {"stage": "quantize", "scheme": scheme, "method": method, "group_size": parse_group_size(group_size),
             "symmetric": symmetric, "range_search": range_search, "ignore": ignore or [],
             "dataset": dataset, "text_column": text_column, "samples": samples, "seq_len": seq_len,
             "dampening": dampening, "block_size": block_size, "actorder": actorder, "awq_grid": awq_grid, "alpha": alpha}
    recipe = validate({
        "model": model, "output": str(output), "overwrite": overwrite, "dtype": dtype, "device": device, "offload": offload,
        "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle, "stages": [stage],
        "evaluate": EvalSpec(enabled=evaluate, dataset=eval_dataset, text_column=text_column, max_tokens=eval_tokens, latency=latency).model_dump(),
    }, "options")
    execute(recipe, save_recipe, json)
