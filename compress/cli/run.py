"""`compress run RECIPE.yaml`: replay a recipe (OUT/recipe.yaml, or one from recipes/)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compress import recipe as recipes
from compress.cli.common import execute
from compress.errors import UsageError


def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file")],
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output directory (overrides the recipe's)")
    ] = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a field: stages.0.scheme=w8a8; repeatable")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory")] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run after its last finished stage (and checkpoint)")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Validate, print the plan with estimates of time, memory and disk; load nothing")
    ] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
) -> None:
    """Run the stages of a recipe and write one report; exit 1 when a gate fails."""
    r = recipes.load(recipe, set_ or [])
    if r.overwrite:
        raise UsageError(f"{recipe}: `overwrite` is not read from a recipe (recipes are shared); pass --overwrite")
    updates = {"overwrite": overwrite}
    if output is not None:
        updates["output"] = str(output)
    r = r.model_copy(update=updates)
    if not r.output:
        raise UsageError(f"{recipe}: no output; pass -o OUT")
    execute(r, None, json, resume=resume, dry_run=dry_run)
