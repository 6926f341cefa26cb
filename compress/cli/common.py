"""Pieces every command shares: run a recipe, show its report, write it down."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from compress import api
from compress.errors import UsageError
from compress.recipe import GroupSize, Recipe
from compress.report import render

err = Console(stderr=True)
out = Console()


def parse_group_size(value: str | None) -> GroupSize | None:
    if value is None or value in ("auto", "channel"):
        return value
    if value.isdigit():
        return int(value)
    raise UsageError(f"--group-size must be a number, 'auto' or 'channel', got {value!r}")


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(recipe.to_yaml() if recipe.output is None else recipe.to_yaml() + f"output: {recipe.output}\n")
    err.print(f"recipe written to {path}")


def execute(recipe: Recipe, save_to: Path | None, as_json: bool) -> None:
    if save_to is not None:
        save_recipe(recipe, save_to)
    report = api.run(recipe, err)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        render.show(report, out)
        out.print(f"checkpoint, report.json and report.md written to {recipe.output}")
