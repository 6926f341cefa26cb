"""`compress search MODEL -o OUT --max-ppl-increase 5%`: the smallest (or fastest) checkpoint
that meets a quality budget, with every candidate tried in its report."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Optional

import typer
from rich.table import Table

from compress import plan, search
from compress.cli.common import (
    AllowPickle,
    Device,
    EvalDataset,
    EvalTokens,
    Model,
    Output,
    Overwrite,
    Tasks,
    TrustRemoteCode,
    default,
    err,
    out,
    task_list,
)
from compress.errors import GateFailed, UsageError
from compress.recipe import EvalSpec, Gates, Recipe
from compress.report import render
from compress.report.schema import Candidate

_eval = partial(default, EvalSpec)  # the recipe's defaults, written once there
_run = partial(default, Recipe)


def _fraction(value: str | None) -> float | None:
    """'5%' or '0.05' -> 0.05."""
    if value is None:
        return None
    text = value.strip()
    try:
        v = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"--max-ppl-increase must be a share such as 5% or 0.05, got {value!r}") from None
    if not 0 <= v < 10:
        raise UsageError(f"--max-ppl-increase must be between 0% and 1000%, got {value!r}")
    return v


def _items(value: str, what: str, kind=str) -> list:
    try:
        return [kind(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{what}: expected a comma-separated list, got {value!r}") from None


def search_command(
    model: Model,
    output: Output,
    max_ppl_increase: Annotated[
        Optional[str], typer.Option(help="Budget: perplexity at most this much above the base (5% or 0.05)")
    ] = None,
    max_kl_divergence: Annotated[
        Optional[float], typer.Option(help="Budget (decoders): mean KL divergence from the base at most, nats/token")
    ] = None,
    max_task_drop: Annotated[
        Optional[float], typer.Option(help="Budget: accuracy points lost at most on the worst --tasks task")
    ] = None,
    min_embedding_similarity: Annotated[
        Optional[float], typer.Option(help="Budget (encoders): mean cosine to the base's embeddings at least")
    ] = None,
    objective: Annotated[
        str, typer.Option(help="size: smallest on disk | decode: fastest decode (every candidate timed)")
    ] = "size",
    schemes: Annotated[str, typer.Option(help="Schemes to try, comma-separated")] = ",".join(search.SCHEMES_TRIED),
    methods: Annotated[str, typer.Option(help="Quantization methods to try, comma-separated")] = ",".join(
        search.METHODS_TRIED
    ),
    group_sizes: Annotated[str, typer.Option(help="Group sizes to try for w4a16, comma-separated")] = ",".join(
        map(str, search.GROUPS_TRIED)
    ),
    sparsity: Annotated[
        str, typer.Option(help="Also try SparseGPT at these sparsities, stored sparse (e.g. 0.5); none by default")
    ] = "",
    samples: Annotated[Optional[int], typer.Option(help="Calibration samples per candidate")] = None,
    eval_dataset: EvalDataset = _eval("dataset"),
    eval_tokens: EvalTokens = _eval("max_tokens"),
    tasks: Tasks = "",
    latency: Annotated[
        Optional[bool],
        typer.Option("--latency/--no-latency", help="Time every candidate (default: only for --objective decode)"),
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto | bfloat16 | float16 | float32")] = _run("dtype"),
    device: Device = _run("device"),
    overwrite: Overwrite = _run("overwrite"),
    trust_remote_code: TrustRemoteCode = _run("trust_remote_code"),
    allow_pickle: AllowPickle = _run("allow_pickle"),
    dry_run: Annotated[
        bool, typer.Option(help="List the candidates in the order they would run, with sizes and times; run nothing")
    ] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the candidates as JSON on stdout")] = False,
) -> None:
    """Find the smallest (or fastest) compressed model that meets a quality budget; write it."""
    if objective not in ("size", "decode"):
        raise UsageError(f"--objective must be size or decode, got {objective!r}")
    spec = search.Spec(
        model=model,
        output=output,
        budget=Gates(
            max_ppl_increase=_fraction(max_ppl_increase),
            max_kl_divergence=max_kl_divergence,
            max_task_drop=max_task_drop,
            min_embedding_similarity=min_embedding_similarity,
        ),
        objective=objective,
        schemes=_items(schemes, "schemes"),
        methods=_items(methods, "methods"),
        group_sizes=_items(group_sizes, "group-sizes", int),
        sparsities=_items(sparsity, "sparsity", float),
        samples=samples,
        evaluate=EvalSpec(
            dataset=eval_dataset,
            max_tokens=eval_tokens,
            tasks=task_list(tasks),
            latency=objective == "decode" if latency is None else latency,
        ),
        overwrite=overwrite,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    outcome = search.run(spec, err, dry_run=dry_run)
    if json:
        import json as jsonlib

        winner = next((c.label for c in outcome.candidates if c.winner), None)
        typer.echo(
            jsonlib.dumps(
                {
                    "objective": objective,
                    "budget": spec.budget.model_dump(exclude_none=True),
                    "winner": winner,
                    "output": str(output) if outcome.report else None,
                    "seconds": outcome.seconds,
                    "candidates": [c.model_dump(mode="json") for c in outcome.candidates],
                },
                indent=2,
            )
        )
    else:
        out.print(table(outcome.candidates, dry_run))
    if dry_run:
        total = sum(c.estimated_seconds for c in outcome.candidates)
        err.print(
            f"dry run: {len(outcome.candidates)} candidates, at most {plan.secs(total)} if every one runs (candidates "
            "that cannot beat one already met are skipped); nothing was loaded or written"
        )
        return
    if outcome.report is None:
        raise GateFailed(
            f"no candidate met the budget ({len(outcome.candidates)} tried, {plan.secs(outcome.seconds)}); "
            "nothing was written; the table shows how close each came"
        )
    best = next(c for c in outcome.candidates if c.winner)
    err.print(
        f"winner: {best.label}, written to {output} with its report (report.html shows every candidate); "
        f"search took {plan.secs(outcome.seconds)}"
    )


def table(candidates: list[Candidate], planned: bool) -> Table:
    t = Table(title="search: candidates in the order considered", title_justify="left")
    for c in ["#", "candidate", "size (est.)", "time (est.)"] if planned else render.SEARCH_HEAD:
        t.add_column(
            c, justify="left" if c in ("candidate", "verdict") else "right", ratio=1 if c == "verdict" else None
        )
    for i, c in enumerate(candidates, 1):
        if planned:
            t.add_row(str(i), c.label, _mib(c.estimated_bytes), plan.secs(c.estimated_seconds))
        else:
            t.add_row(*render.search_row(i, c))
    return t


def _mib(b: int) -> str:
    return f"{b / 2**20:,.2f} MiB"
