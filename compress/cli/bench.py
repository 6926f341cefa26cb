"""`compress bench MODEL [--baseline BASE] [--runtime ...]`: prefill and decode speed, side by side."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from compress.cli.common import Json, err, out
from compress.errors import UsageError
from compress.models import load as loading


def bench(
    model: Annotated[str, typer.Argument(help="Checkpoint, ONNX export directory, or .gguf (for --runtime llama.cpp)")],
    baseline: Annotated[
        Optional[str], typer.Option(help="Model to compare against (e.g. the original checkpoint)")
    ] = None,
    runtime: Annotated[str, typer.Option(help="Runtime for MODEL: torch | onnxruntime | llama.cpp")] = "torch",
    baseline_runtime: Annotated[str, typer.Option(help="Runtime for the baseline")] = "torch",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma separated")] = "1",
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens (prefill)")] = 512,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated after the prompt (decode)")] = 128,
    rounds: Annotated[int, typer.Option(help="Timed rounds per model (median reported)")] = 3,
    threads: Annotated[int, typer.Option(help="CPU threads (0: torch's default)")] = 0,
    accuracy_level: Annotated[
        Optional[int],
        typer.Option(
            help="When MODEL is a checkpoint run on onnxruntime: MatMulNBits accuracy level of the export (default as "
            "`compress export`)"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda (torch runtime)")] = "cpu",
    json: Json = False,
) -> None:
    """Measure prefill tokens/s, decode tokens/s, time to first token and memory."""
    # onnx and onnxruntime take about a second to import: only the commands that use them load them.
    from compress.eval import bench as benching

    try:
        batches = [int(b) for b in batch.split(",")]
    except ValueError:
        raise UsageError(f"--batch takes comma-separated integers, got {batch!r}") from None
    if any(b < 1 for b in batches) or prompt_len < 1 or new_tokens < 1 or rounds < 1:
        raise UsageError("--batch, --prompt-len, --new-tokens and --rounds must be at least 1")
    loading.check_device(device)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    for spec in filter(None, (model, baseline)):
        limit = benching.context_length(spec)
        if limit is not None and prompt_len + new_tokens > limit:
            raise UsageError(
                f"--prompt-len {prompt_len} + --new-tokens {new_tokens} = {prompt_len + new_tokens} positions; "
                f"{spec} takes at most {limit}"
            )
    n_ctx = prompt_len + new_tokens + 8
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        subjects = []
        if baseline:
            err.print(f"loading baseline {baseline} ({baseline_runtime}) ...")
            subjects.append(
                benching.open_subject(
                    "baseline", baseline, baseline_runtime, threads, device, Path(tmp), accuracy_level, n_ctx
                )
            )
        err.print(f"loading {model} ({runtime}) ...")
        subjects.append(
            benching.open_subject("model", model, runtime, threads, device, Path(tmp), accuracy_level, n_ctx)
        )
        err.print(f"measuring: batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, {rounds} rounds ...")
        try:
            rows = benching.measure(subjects, batches, prompt_len, new_tokens, rounds)
        finally:
            for s in subjects:
                getattr(s.decoder, "close", lambda: None)()
    env = benching.environment(threads, device)
    args = {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "protocol": "greedy, KV cache, rounds interleaved, median",
    }
    if json:
        typer.echo(benching.as_json(env, args, rows))
        return
    out.print(
        f"{env['device']}, {threads} threads; prompt {prompt_len} tokens, {new_tokens} new tokens; greedy with KV "
        f"cache; "
        f"median of {rounds} interleaved rounds"
    )
    t = Table("", "runtime", "batch", "TTFT ms", "prefill tok/s", "decode tok/s", "MiB", "prefill x", "decode x")
    for r in rows:
        t.add_row(
            r.role,
            r.runtime,
            str(r.batch),
            f"{r.ttft_ms:.1f}",
            f"{r.prefill_tokens_per_s:.1f}",
            f"{r.decode_tokens_per_s:.1f}",
            f"{r.memory_bytes / 2**20:.0f}",
            f"{r.prefill_speedup:.2f}x" if r.prefill_speedup else "",
            f"{r.decode_speedup:.2f}x" if r.decode_speedup else "",
        )
    out.print(t)
    for r in {r.role: r for r in rows}.values():
        out.print(f"{r.role}: {r.spec} - {r.kernel}, {r.dtype}")
