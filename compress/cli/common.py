"""Pieces every command shares: run a recipe, show its report, write it down."""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.console import Console

from compress import api, plan
from compress.errors import CompressError, GateFailed, UsageError, printable
from compress.formats.atomic import check_not_input
from compress.models import source as sources
from compress.recipe import EvalSpec, GroupSize, Recipe, validate
from compress.report import render


class SafeConsole(Console):
    """Prints text with its control characters neutralised (paths, model names and notes come
    from files the user may not have written)."""

    def print(self, *objects, **kwargs) -> None:
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)


err = SafeConsole(stderr=True)
out = SafeConsole()

# Options every model-changing command takes (Typer reads them from these annotations).
Model = Annotated[str, typer.Argument(help="HF directory, .gguf file, hub id, or built-in: smollm2-135m, minilm-l6")]
Output = Annotated[Path, typer.Option("--output", "-o", help="Directory to write (must not exist unless --overwrite)")]
Dataset = Annotated[
    str,
    typer.Option(
        help="Calibration text: 'builtin', 'generated' (sampled from the model), a .txt/.jsonl/.parquet path or "
        "folder, a hub dataset, or a mix of them joined by + (builtin+generated: equal shares)"
    ),
]
TextColumn = Annotated[str, typer.Option(help="Column holding the text in .jsonl/.parquet/hub datasets")]
Samples = Annotated[int, typer.Option(help="Calibration samples")]
SeqLen = Annotated[int, typer.Option(help="Tokens per calibration sample")]
Device = Annotated[str, typer.Option(help="cpu | cuda")]
EvalAlso = Annotated[
    list[str],
    typer.Option(
        help="Another evaluation text, scored beside the first (perplexity, KL divergence), e.g. 'licenses'; repeatable"
    ),
]
EvalDataset = Annotated[
    str,
    typer.Option(
        help="Evaluation text: 'builtin' (held-out help pages), 'licenses' (license texts no calibration reads), a "
        ".txt/.jsonl/.parquet path, or a hub dataset"
    ),
]
EvalTokens = Annotated[int, typer.Option(help="Tokens scored for perplexity")]
Evaluate = Annotated[bool, typer.Option("--eval/--no-eval", help="Measure base and result")]
Latency = Annotated[bool, typer.Option("--latency/--no-latency", help="Measure prefill and decode speed")]
Kl = Annotated[
    bool,
    typer.Option(
        "--kl-divergence/--no-kl-divergence",
        help="Decoders: KL divergence and top-1 agreement against the base (two more forward passes)",
    ),
]
Tasks = Annotated[
    str,
    typer.Option(
        help="lm-eval tasks scored on base and result, comma-separated: everyday_facts (shipped) or lm-eval's own "
        "(needs compress[eval])"
    ),
]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output directory")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Run Python code shipped with the model (unsafe)")]
AllowPickle = Annotated[bool, typer.Option(help="Load pickled .bin weights (unsafe)")]
SaveRecipe = Annotated[Optional[Path], typer.Option(help="Also write the equivalent recipe YAML here")]
Json = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")]


def _cli_type(info: FieldInfo) -> type:
    """The type Typer parses an option field as: its scalar type, or text the field parses itself."""
    if (info.json_schema_extra or {}).get("cli") == "text":
        return str
    union = get_origin(info.annotation) in (Union, types.UnionType)
    kinds = [a for a in (get_args(info.annotation) if union else (info.annotation,)) if a is not type(None)]
    kind = kinds[0] if len(kinds) == 1 else str
    return str if get_origin(kind) is Literal or kind not in (bool, int, float, str) else kind


def method_options(*tables: dict) -> Callable:
    """Give a command one option per field of its methods' options models (each method file
    declares them; default None: the model's own default applies). The command receives them
    in **options."""
    fields: dict[str, FieldInfo] = {}
    for table in tables:
        for m in table.values():
            for name, info in m.Options.model_fields.items():
                fields.setdefault(name, info)

    def decorate(command: Callable) -> Callable:
        sig = inspect.signature(command)
        hints = typing.get_type_hints(command, include_extras=True)  # the file's annotations are strings
        params = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in sig.parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        for name, info in fields.items():
            kind = _cli_type(info)
            flag = f"--{name.replace('_', '-')}"
            option = typer.Option(f"{flag}/--no-{flag[2:]}" if kind is bool else flag, help=info.description)
            params.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], option]
                )
            )
        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def default(model: type[BaseModel], field: str) -> Any:
    """A command option's default: the recipe field's own, so each default is written once."""
    return model.model_fields[field].default


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The method options given on the command line (None: not given)."""
    return {k: v for k, v in options.items() if v is not None}


def method_help(table: dict) -> str:
    return " | ".join(table)


def one_stage(
    stage: dict[str, Any],
    *,
    model: str,
    output: Path,
    overwrite: bool,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    allow_pickle: bool,
    evaluate: bool,
    eval_dataset: str,
    text_column: str,
    eval_tokens: int,
    eval_also: list[str] | None = None,
    latency: bool,
    tasks: str = "",
    offload: bool = False,
    kl: bool = True,
) -> Recipe:
    """The recipe a single command stands for."""
    return validate(
        {
            "model": model,
            "output": str(output),
            "overwrite": overwrite,
            "dtype": dtype,
            "device": device,
            "offload": offload,
            "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle,
            "stages": [stage],
            "evaluate": EvalSpec(
                enabled=evaluate,
                dataset=eval_dataset,
                also=eval_also or [],
                text_column=text_column,
                max_tokens=eval_tokens,
                latency=latency,
                tasks=task_list(tasks),
                kl_divergence=kl,
            ).model_dump(),
        },
        "options",
    )


def task_list(value: str) -> list[str]:
    """--tasks a,b -> ["a", "b"]."""
    return [t.strip() for t in value.split(",") if t.strip()]


def parse_group_size(value: str | None) -> GroupSize | None:
    if value is None or value in ("auto", "channel"):
        return value
    if value.isdigit():
        return int(value)
    raise UsageError(f"--group-size must be a number, 'auto' or 'channel', got {value!r}")


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the recipe to `path` (checked by `check_save_path`), whole or not at all."""
    text = recipe.to_yaml() if recipe.output is None else recipe.to_yaml() + f"output: {recipe.output}\n"
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CompressError(f"cannot write the recipe to {path}: {exc.strerror or exc}") from None
    err.print(f"recipe written to {path}")


def check_save_path(recipe: Recipe, path: Path) -> None:
    """--save-recipe gets the output's protections: no existing file unless --overwrite, never
    a file or folder the run reads, never inside the output (which --overwrite replaces)."""
    if path.is_dir():
        raise UsageError(f"--save-recipe {path} is a directory; give a file name")
    if path.exists() and not recipe.overwrite:
        raise UsageError(f"--save-recipe {path} already exists; pass --overwrite to replace it")
    src = sources.resolve(recipe.model, recipe.allow_pickle)
    teachers = [sources.resolve(s.teacher, recipe.allow_pickle) for s in recipe.stages if getattr(s, "teacher", None)]
    check_not_input([(path, "--save-recipe")], api.read_by(recipe, src, teachers))
    if recipe.output:
        out = Path(recipe.output).resolve()
        if path.resolve() == out or out in path.resolve().parents:
            raise UsageError(f"--save-recipe {path} is inside the output {recipe.output}; write it elsewhere")


def execute(recipe: Recipe, save_to: Path | None, as_json: bool, resume: bool = False, dry_run: bool = False) -> None:
    """Run the recipe and print its report; exit 1 when a gate fails (the output is written)."""
    checked = None
    if save_to is not None and api.is_main_process():
        check_save_path(recipe, save_to)
        checked = lambda: save_recipe(recipe, save_to)  # noqa: E731 - once every check has passed
    report = api.run(recipe, err, resume=resume, dry_run=dry_run, checked=checked)
    if report is None:  # a non-main process of a distributed job: the main one reports
        return
    if dry_run:
        show_plan(report, as_json)
        return
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        render.show(report, out)
        out.print(f"checkpoint and report (report.json, report.md, report.html) written to {recipe.output}")
    if report.passed is False:
        failed = [g for g in report.gates if not g.passed]
        raise GateFailed(
            f"{len(failed)} of {len(report.gates)} gates failed: "
            + "; ".join(f"{g.name} {g.shown}" for g in failed)
            + f" (the checkpoint is in {recipe.output}, marked failing in its report)"
        )


def show_plan(p: plan.Plan, as_json: bool) -> None:
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    if as_json:
        import dataclasses
        import json

        typer.echo(json.dumps({**dataclasses.asdict(p), "peak_bytes": p.peak_bytes}, indent=2))
        return
    out.print(plan.table(p))
    out.print(
        f"output weights: {mib(p.output_bytes)}; disk needed: {mib(p.disk_bytes)} ({mib(p.disk_free)} free); "
        f"peak memory: {mib(p.peak_bytes)} ({mib(p.memory_available)} available)"
    )
    for n in p.notes:
        out.print(f"note: {n}")
    plan.check(p)
    out.print("dry run: the recipe is valid and fits this machine; nothing was loaded or written")
