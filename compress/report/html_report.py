"""report.html: one self-contained page (plots inlined as PNG data, no script, no network) with
the tables of report.md and the plots people would rather look at than read."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from compress.report import plots, render
from compress.report.schema import Measurement, Report

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.45em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
tr.pass td.verdict { background: #d9f2d9; color: #175e17; font-weight: 600; }
tr.fail td.verdict { background: #f8d4d4; color: #8a1515; font-weight: 600; }
.banner { padding: .6em 1em; border-radius: 4px; font-weight: 600; }
.banner.pass { background: #d9f2d9; } .banner.fail { background: #f8d4d4; } .banner.warn { background: #fff0c2; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
ul.details li { margin: .2em 0; } code { background: #f3f3f3; padding: 0 3px; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(head: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = []
    for n, row in enumerate(rows):
        cls = f' class="{classes[n]}"' if classes else ""
        tds = "".join(
            f'<td class="verdict">{_e(c)}</td>' if classes and k == len(row) - 1 else f"<td>{_e(c)}</td>"
            for k, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(png: bytes | None, alt: str, caption: str) -> str:
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _gates(report: Report) -> str:
    if not report.gates:
        return ""
    verdict = "pass" if report.passed else "fail"
    rows = [[g.name, g.shown, "pass" if g.passed else "FAIL"] for g in report.gates]
    classes = ["pass" if g.passed else "fail" for g in report.gates]
    title = "all passed" if report.passed else "FAILED"
    return f'<h2>Gates</h2><p class="banner {verdict}">Gates: {title}</p>' + _table(
        ["gate", "measured (limit)", "result"], rows, classes
    )


def _speed_banner(report: Report) -> str:
    if report.speed is not None and report.speed.noisy:
        return (
            '<p class="banner warn">The machine was busy while timing: the speed ratios of adjacent rounds spread '
            "too widely to state one. Rerun on a quiet machine.</p>"
        )
    return ""


def _search(report: Report) -> str:
    if not report.search:
        return ""
    classes = ["pass" if c.winner else ("fail" if c.verdict in ("missed", "failed") else "") for c in report.search]
    return (
        "<h2>Search</h2><p>This checkpoint is the winner of <code>compress search</code>; every candidate "
        "considered, in order:</p>" + _table(render.SEARCH_HEAD, render.search_rows(report), classes)
    )


def page(report: Report, candidates: list[tuple[str, Measurement]] = ()) -> str:
    """The whole report as one HTML document (a search's candidates are plotted beside base and result)."""
    candidates = list(candidates) or [(c.label, c.result) for c in report.search if c.result and not c.winner]
    summary = _table(["metric", "base", "result", "change"], [list(r) for r in render.rows(report)])
    figures = "".join(
        [
            _figure(
                plots.size_quality(report, list(candidates)),
                "size against quality",
                "Size on disk against quality on the evaluation text"
                + (f" ({report.result.perplexity.text})" if report.result.perplexity else "")
                + ": base, result"
                + (" and every candidate tried." if candidates else "."),
            ),
            _figure(
                plots.layer_errors(report),
                "per-layer output error",
                "Relative output error of each decoder layer on the first calibration batches: plain min/max RTN "
                "against the method, for every stage that reports it.",
            ),
            _figure(
                plots.latency(report),
                "latency",
                "Tokens/s at batch 1, median of the interleaved rounds; the bars span the fastest and slowest round.",
            ),
            _figure(plots.loss_curve(report), "distillation loss", "Training loss per optimizer step (log scale)."),
        ]
    )
    tables = "".join(
        f"<details><summary>{_e(title)}</summary>{_table(head, rows)}</details>"
        for title, head, rows in _tables(report)
    )
    details = "".join(f"<li>{_e(line.removeprefix('- '))}</li>" for line in render.details(report))
    env = "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in report.environment.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>compress report: {_e(report.model)}</title>
<style>{STYLE}</style></head>
<body>
<h1>compress report: {_e(report.model)}</h1>
<p>Task: {_e(report.task)}. Output: <code>{_e(report.result.path)}</code>. Created {_e(report.created)} by
{_e(report.tool)}.</p>
{_speed_banner(report)}
{summary}
{_gates(report)}
{_search(report)}
<h2>Plots</h2>
{figures or "<p>Nothing to plot: the report has no measurements.</p>"}
<h2>How it was measured</h2>
<ul class="details">{details}</ul>
{tables}
<h2>Environment</h2>
<ul>{env}</ul>
</body></html>
"""


def _tables(report: Report) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    for s in report.stages:
        if s.layer_errors and s.stage == "quantize":
            rows = [
                [str(e.layer), f"{e.rtn:.4f}" if e.rtn is not None else "-", f"{e.method:.4f}"] for e in s.layer_errors
            ]
            out.append(("Per-layer output error (quantize)", ["layer", "rtn", s.settings["method"]], rows))
        elif s.layer_errors:
            rows = [[str(e.layer), f"{e.method:.4f}"] for e in s.layer_errors]
            out.append((f"Per-layer output error ({s.stage})", ["layer", "error"], rows))
        if s.layer_sparsity:
            rows = [[str(e["layer"]), f"{e['sparsity']:.4f}"] for e in s.layer_sparsity]
            out.append(("Sparsity per layer", ["layer", "sparsity"], rows))
    return out


def write(report: Report, dest: Path) -> None:
    """report.json, report.md (its loss curve beside it) and report.html into dest."""
    (dest / "report.json").write_text(report.model_dump_json(indent=2))
    (dest / "report.md").write_text(render.markdown(report, plots.write_loss_curve(report, dest)))
    (dest / "report.html").write_text(page(report))
