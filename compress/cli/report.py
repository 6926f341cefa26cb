"""`compress report OUT`: print the report a run left in OUT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from compress.cli.common import out
from compress.errors import UsageError
from compress.report import render
from compress.report.schema import Report


def report(
    output: Annotated[Path, typer.Argument(help="A directory written by compress")],
    json: Annotated[bool, typer.Option("--json", help="Print report.json")] = False,
) -> None:
    """Re-print the report of an earlier run."""
    path = output / "report.json"
    if not path.is_file():
        raise UsageError(f"{output} has no report.json (was it written by compress?)")
    try:
        rep = Report.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise UsageError(f"{path} is not a compress report ({exc.error_count()} errors)") from None
    if json:
        typer.echo(rep.model_dump_json(indent=2))
    else:
        render.show(rep, out)
