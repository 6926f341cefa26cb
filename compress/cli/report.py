"""`compress report OUT`: print the report a run left in OUT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from compress.cli.common import err, out
from compress.errors import UsageError
from compress.recipe import Gates
from compress.report import gates, render
from compress.report.schema import Report


def rederive(rep: Report) -> Report:
    """Each gate's verdict and the overall result computed again from the measured values the
    report shows (a hand-edited or stale flag does not count)."""
    spec = rep.recipe.get("gates") if isinstance(rep.recipe, dict) else None
    if not spec or not any(v is not None for v in spec.values()):
        return rep
    try:
        derived = gates.check(Gates.model_validate(spec), rep)
    except ValidationError as exc:
        raise UsageError(f"the report's recipe holds unreadable gates ({exc.error_count()} errors)") from None
    passed = all(g.passed for g in derived)
    if [(g.name, g.passed) for g in derived] != [(g.name, g.passed) for g in rep.gates] or passed != rep.passed:
        err.print(
            "warning: the report's stored gate verdicts disagree with its measured values; "
            "showing the verdicts computed from the values"
        )
    return rep.model_copy(update={"gates": derived, "passed": passed})


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
    rep = rederive(rep)
    if json:
        typer.echo(rep.model_dump_json(indent=2))
    else:
        render.show(rep, out)
