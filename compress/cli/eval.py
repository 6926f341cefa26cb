"""`compress eval MODEL [--baseline BASE]`: measure any checkpoint the way `quantize` does."""

from __future__ import annotations

import datetime
import json as jsonlib
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

import compress
from compress import api
from compress.cli.common import EvalAlso, EvalDataset, Kl, Tasks, default, err, out, task_list
from compress.data import text as textdata
from compress.eval import size
from compress.eval.measure import measure
from compress.eval.tasks import check as check_tasks
from compress.formats import sparse
from compress.models import load as loading, source as sources
from compress.recipe import EvalSpec
from compress.report import render
from compress.report.schema import Report


def _checkpoint(spec: str, allow_pickle: bool) -> tuple[Path, str]:
    src = sources.resolve(spec, allow_pickle)
    # sparse storage is measured as it is on disk (the worker densifies it to load it)
    path = src.path if sparse.is_sparse(src.path) else loading.checkpoint_dir(src, "auto")
    loading.check_weights(path)
    config = jsonlib.loads((path / "config.json").read_text())
    return path, loading.task_of(config.get("architectures"))


def evaluate(
    model: Annotated[str, typer.Argument(help="Checkpoint to measure (directory, .gguf, hub id or built-in alias)")],
    baseline: Annotated[Optional[str], typer.Option(help="Checkpoint to compare against")] = None,
    dataset: EvalDataset = default(EvalSpec, "dataset"),
    also: EvalAlso = default(EvalSpec, "also"),
    eval_tokens: Annotated[int, typer.Option(help="Tokens scored for perplexity")] = default(EvalSpec, "max_tokens"),
    seq_len: Annotated[int, typer.Option(help="Perplexity window length")] = default(EvalSpec, "seq_len"),
    latency: Annotated[bool, typer.Option("--latency/--no-latency")] = default(EvalSpec, "latency"),
    kl: Kl = default(EvalSpec, "kl_divergence"),
    tasks: Tasks = "",
    reuse_base: Annotated[
        bool,
        typer.Option(
            "--reuse-base/--measure-base",
            help="Read back the baseline's measurement from an earlier run of the same weights, text and settings",
        ),
    ] = True,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    allow_pickle: Annotated[bool, typer.Option(help="Load pickled .bin weights (unsafe)")] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
) -> None:
    """Measure size, quality, speed and memory of a checkpoint, optionally against a baseline."""
    loading.check_device(device)
    spec = EvalSpec(
        dataset=dataset,
        also=also,
        max_tokens=eval_tokens,
        seq_len=seq_len,
        latency=latency,
        kl_divergence=kl,
        tasks=task_list(tasks),
    )
    path, task = _checkpoint(model, allow_pickle)
    base_path = _checkpoint(baseline, allow_pickle)[0] if baseline else None
    texts = textdata.evaluation(dataset, spec.also, spec.text_column)
    check_tasks(spec.tasks, task)
    layers = size.compressed_layers(path)
    base, speed = None, None
    with tempfile.TemporaryDirectory(prefix="compress-emb-") as tmp:
        emb = Path(tmp) / "base.pt"
        if base_path is not None:
            err.print(f"measuring {baseline} ...")
            untimed = spec.model_copy(update={"latency": False})  # timed below, beside the model
            base = measure(
                base_path, task, untimed, texts, layers, device, keep_embeddings=emb, reuse=reuse_base
            ).measurement
        err.print(f"measuring {model} ..." + (f" (timed against {baseline})" if base and latency else ""))
        got = measure(
            path, task, spec, texts, layers, device, base_embeddings=emb if base else None,
            timed_with=base_path if latency else None, compared_with=base_path if kl else None,
        )  # fmt: skip
        result, speed = got.measurement, got.speed
        if base is not None:
            base.latency = got.base_latency
    rep = Report(
        tool=f"compress {compress.__version__}",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model=model,
        task=task,
        recipe={},
        stages=[],
        base=base,
        result=result,
        environment=api.environment(),
        speed=speed,
    )
    if json:
        typer.echo(rep.model_dump_json(indent=2))
    else:
        render.show(rep, out)
