"""Render a report as Markdown (for people and PRs) and as a rich table (for the terminal)."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from compress.errors import printable
from compress.eval.latency import NOISY_SPREAD
from compress.report.schema import Candidate, Domain, Measurement, Report

MB = 1024 * 1024


def rows(report: Report) -> list[tuple[str, str, str, str]]:
    """(metric, base, result, change) rows; change is a ratio or a relative difference."""
    b, r = report.base, report.result

    def fmt(m: Measurement | None, get, spec: str) -> str:
        v = get(m) if m is not None else None
        return "-" if v is None else format(v, spec)

    def change(get, kind: str) -> str:
        if b is None:
            return ""
        if kind in ("prefill", "decode"):
            return speed_change(report, kind)
        vb, vr = get(b), get(r)
        if kind == "points" and vb is not None and vr is not None:
            return f"{vr - vb:+.1f} points"
        if vb is None or vr is None or vb == 0:
            return ""
        return f"{vr / vb:.3f}x" if kind == "ratio" else f"{(vr - vb) / vb * 100:+.2f}%"

    rows = [
        ("size on disk (MiB)", lambda m: m.bytes_on_disk / MB, ".1f", "ratio"),
        ("parameters (M)", lambda m: m.parameters and m.parameters / 1e6, ".2f", "ratio"),
        ("bits per weight (compressed layers)", lambda m: m.bits_per_weight, ".2f", "ratio"),
    ]
    if r.perplexity:
        rows.append(
            (f"perplexity ({r.perplexity.tokens} tokens)", lambda m: m.perplexity and m.perplexity.value, ".3f", "rel")
        )
    if r.divergence:  # against the base: the base's own column stays empty
        rows += [
            ("KL divergence vs base (mean, nats)", lambda m: m.divergence and m.divergence.kl_mean, ".4f", ""),
            ("KL divergence vs base (99th percentile)", lambda m: m.divergence and m.divergence.kl_p99, ".4f", ""),
            ("top-1 agreement with base, %", lambda m: m.divergence and m.divergence.top1_agreement * 100, ".2f", ""),
        ]
    for i, d in enumerate(r.domains):  # `evaluate.also`: each further text's rows
        name = domain_name(d.perplexity.text)
        rows.append((f"perplexity, {name} ({d.perplexity.tokens} tokens)", partial(_ppl, i=i), ".3f", "rel"))
        if d.divergence:
            rows.append((f"KL divergence vs base, {name} (mean, nats)", partial(_kl, i=i), ".4f", ""))
            rows.append((f"top-1 agreement with base, {name}, %", partial(_top1, i=i), ".2f", ""))
    if r.similarity:
        rows.append(("embedding cosine vs base (mean)", lambda m: m.similarity and m.similarity.mean, ".4f", ""))
        rows.append(("embedding cosine vs base (min)", lambda m: m.similarity and m.similarity.min, ".4f", ""))
    for name, score in r.tasks.items():
        rows.append(
            (
                f"{name} accuracy, % ({score.samples or '?'} questions)",
                lambda m, name=name: m.tasks[name].value * 100 if name in m.tasks else None,
                ".1f",
                "points",
            )
        )
    if r.latency:
        rows.append(
            ("prefill tokens/s (batch 1)", lambda m: m.latency and m.latency.prefill_tokens_per_s, ".1f", "prefill")
        )
        if r.latency.decode_tokens_per_s:
            rows.append(
                ("decode tokens/s (batch 1)", lambda m: m.latency and m.latency.decode_tokens_per_s, ".1f", "decode")
            )
    rows += [
        (
            "weights in memory (MiB)",
            lambda m: m.weights_in_memory_bytes and m.weights_in_memory_bytes / MB,
            ".1f",
            "ratio",
        ),
        ("peak memory, load + eval (MiB)", lambda m: m.peak_rss_bytes and m.peak_rss_bytes / MB, ".0f", "ratio"),
    ]
    return [
        (name, fmt(b, get, spec), fmt(r, get, spec), change(get, kind) if kind else "")
        for name, get, spec, kind in rows
    ]


def speed_change(report: Report, which: str) -> str:
    """The speed ratio as measured: median and range of interleaved rounds, or why there is none."""
    sp = report.speed
    if sp is None or getattr(sp, which) is None:
        return "not timed together"  # e.g. a report from before interleaving: two processes, no ratio
    lo, hi = getattr(sp, f"{which}_range")
    if sp.noisy:
        return f"noisy: {lo:.2f}x to {hi:.2f}x"
    return f"{getattr(sp, which):.2f}x ({lo:.2f}-{hi:.2f})"


def _domain(m: Measurement, i: int) -> Domain | None:
    return m.domains[i] if len(m.domains) > i else None


def _ppl(m: Measurement, i: int) -> float | None:
    return (d := _domain(m, i)) and d.perplexity.value


def _kl(m: Measurement, i: int) -> float | None:
    return (d := _domain(m, i)) and d.divergence and d.divergence.kl_mean


def _top1(m: Measurement, i: int) -> float | None:
    return (d := _domain(m, i)) and d.divergence and d.divergence.top1_agreement * 100


def domain_name(text: str) -> str:
    """A short name for an evaluation text: `licenses` for "licenses: Debian license texts (...)", a file's name."""
    head = text.split(":")[0] if ":" in text.split(" (")[0] else text.split(" (")[0]
    return Path(head).name[:40] or head[:40]


def details(report: Report) -> list[str]:
    r = report.result
    out = [
        f"- stage `{s.stage}`: "
        + ", ".join(f"{k}={v}" for k, v in s.settings.items())
        + f"; {s.layers} layers, {s.seconds:.1f}s; kept in full precision: {', '.join(s.ignored) or 'none'}"
        for s in report.stages
    ]
    if r.perplexity:
        p = r.perplexity
        out.append(f"- perplexity: {p.text}; {p.tokens} tokens in windows of {p.seq_len}; {p.protocol}")
    if report.base is not None and report.base.reused_from:
        out.append(
            f"- base: size, quality and memory as measured at {report.base.reused_from} by an earlier run of the same "
            "weights, text, settings, libraries and threads (evaluate.reuse_base: false measures it again)"
        )
    if r.divergence:
        d = r.divergence
        out.append(
            f"- divergence: {d.positions} positions of the perplexity windows; {d.protocol}; max {d.kl_max:.3f} nats"
        )
    for d in r.domains:
        out.append(f"- perplexity, {domain_name(d.perplexity.text)}: {d.perplexity.text}; {d.perplexity.tokens} tokens")
    if r.similarity:
        out.append(f"- similarity: {r.similarity.text}; {r.similarity.texts} texts; {r.similarity.protocol}")
    for name, t in r.tasks.items():
        base_t = report.base.tasks.get(name) if report.base else None
        err = ", ".join(
            f"{who} ±{x.stderr * 100:.1f}" for who, x in (("base", base_t), ("result", t)) if x and x.stderr is not None
        )
        out.append(f"- task {name}: {t.metric} on {t.samples or '?'} questions; {t.protocol}; standard error {err}")
    if r.latency:
        lt = r.latency
        out.append(
            f"- speed: runtime {lt.runtime}, kernel: {lt.kernel}; device {lt.device}; batch {lt.batch}, prompt "
            f"{lt.prompt_len} tokens"
            + (f", {lt.new_tokens} new tokens (greedy, KV cache)" if lt.new_tokens else "")
            + f"; median of {lt.rounds} rounds"
            + (f", interleaved with the base's in one process ({report.speed.protocol})" if report.speed else "")
        )
        if report.speed and report.speed.noisy:
            out.append(
                f"- speed: the machine was busy while timing (ratios of adjacent rounds spread wider than "
                f"{NOISY_SPREAD:.2f}x): no speed ratio is stated; rerun on a quiet machine"
            )
    for s in report.stages:
        if s.calibration:
            out.append(f"- {'training text' if s.stage == 'distill' else 'calibration'}: {s.calibration}")
        if s.peak_memory_bytes:
            out.append(
                f"- peak memory while `{s.stage}` ran: {s.peak_memory_bytes / MB:.0f} MiB above the process before the "
                f"model was loaded (model included)"
            )
        out += [f"- warning: {w}" for w in s.warnings]
    out += [f"- {n}" for n in report.notes]
    return out


def layer_table(report: Report) -> list[str]:
    out: list[str] = []
    for s in report.stages:
        if not s.layer_errors:
            continue
        method = s.settings["method"]
        if s.stage == "quantize":
            widths = widths_by_layer(s.linear_bits or {})
            out += [
                "## Per-layer output error (quantize)",
                "",
                "Relative error of each decoder layer's output against the float layer, on the first calibration "
                "batches "
                f"(inputs already quantized up to that layer): plain min/max RTN vs {method}"
                + ("; each linear's weight bits (mixed precision)." if widths else "."),
                "",
                f"| layer | rtn | {method} |" + (" bits |" if widths else ""),
                "|---|---|---|" + ("---|" if widths else ""),
                *[
                    f"| {e.layer} | {e.rtn:.4f} | {e.method:.4f} |"
                    + (f" {widths.get(e.layer, '')} |" if widths else "")
                    for e in s.layer_errors
                ],
                "",
            ]
        else:
            out += [
                "## Per-layer output error (prune)",
                "",
                f"Relative error of each decoder layer's output against the dense layer, on the first calibration "
                f"batches ({method}).",
                "",
                "| layer | error |",
                "|---|---|",
                *[f"| {e.layer} | {e.method:.4f} |" for e in s.layer_errors],
                "",
            ]
    return out


def widths_by_layer(linear_bits: dict[str, int]) -> dict[int, str]:
    """Per decoder layer index, its linears' widths: "q_proj 3, k_proj 5, ..." from full names."""
    out: dict[int, list[str]] = {}
    for name, bits in linear_bits.items():
        if m := re.search(r"\.(\d+)\.(?:[^.]+\.)*([^.]+)$", name):
            out.setdefault(int(m.group(1)), []).append(f"{m.group(2)} {bits}")
    return {i: ", ".join(parts) for i, parts in out.items()}


def expert_table(report: Report) -> list[str]:
    """Per mixture-of-experts layer, how the router spread the calibration tokens over its experts."""
    out: list[str] = []
    for s in report.stages:
        if not s.expert_tokens:
            continue
        out += [
            f"## Experts ({s.stage})",
            "",
            "Calibration tokens the router sent to each expert. Every expert was calibrated on every token (only the "
            "routed tokens' outputs count), so an expert the text rarely reaches still has its statistics.",
            "",
            "| layer | experts | tokens routed: min | median | max | experts with none |",
            "|---|---|---|---|---|---|",
        ]
        for name, counts in s.expert_tokens.items():
            c = sorted(counts)
            out.append(f"| {name} | {len(c)} | {c[0]} | {c[len(c) // 2]} | {c[-1]} | {sum(x == 0 for x in c)} |")
        out.append("")
    return out


def sparsity_table(report: Report) -> list[str]:
    rows = [e for s in report.stages for e in s.layer_sparsity]
    if not rows:
        return []
    return [
        "## Sparsity per layer",
        "",
        "Share of exactly-zero weights in each pruned linear layer.",
        "",
        "| layer | sparsity |",
        "|---|---|",
        *[f"| {e['layer']} | {e['sparsity']:.4f} |" for e in rows],
        "",
    ]


def training_section(report: Report, plot: str | None = None) -> list[str]:
    out: list[str] = []
    for s in report.stages:
        t = s.training
        if t is None:
            continue
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        first, last = (t.curve[0], t.curve[-1]) if t.curve else ({}, {})
        gap = None
        if None not in (t.teacher_perplexity, t.student_perplexity_before, t.student_perplexity_after):
            before = t.student_perplexity_before - t.teacher_perplexity
            gap = (before - (t.student_perplexity_after - t.teacher_perplexity)) / before if before > 0 else None
        out += [
            "## Distillation",
            "",
            f"{t.steps} steps, {t.tokens:,} tokens in {t.seconds:.0f} s ({t.tokens_per_s or 0:,.0f} tokens/s, "
            f"{t.processes} process(es), {t.compute})"
            + (f", resumed at step {t.resumed_from}" if t.resumed_from else "")
            + f"; training text: {t.text}.",
            "",
            "| held-out perplexity | value |",
            "|---|---|",
            f"| teacher | {fmt(t.teacher_perplexity)} |",
            f"| student before | {fmt(t.student_perplexity_before)} |",
            f"| student after | {fmt(t.student_perplexity_after)} |",
            *([f"| gap to the teacher closed | {gap:.1%} |"] if gap is not None else []),
            "",
            f"Training loss: {first.get('loss', float('nan')):.4f} at step 1, {last.get('loss', float('nan')):.4f} at "
            f"step {last.get('step', 0)} "
            "(per-step values in report.json).",
            *([f"Pruned zeros held fixed: {t.masked_zeros:,}."] if t.masked_zeros else []),
            *(
                [
                    f"Quantized linears trained through their grid (straight-through) and saved quantized: "
                    f"{t.fake_quantized}."
                ]
                if t.fake_quantized
                else []
            ),
            "",
            *([f"![training loss]({plot})", ""] if plot else []),
        ]
    return out


SEARCH_HEAD = ["#", "candidate", "size on disk", "quality", "seconds", "verdict"]


def quality_text(m: Measurement | None) -> str:
    """Perplexity (decoders) or embedding cosine to the base (encoders), as one short phrase."""
    if m is not None and m.perplexity is not None:
        return f"perplexity {m.perplexity.value:.3f}"
    if m is not None and m.similarity is not None:
        return f"cosine {m.similarity.mean:.4f}"
    return ""


def search_row(i: int, c: Candidate) -> list[str]:
    """One candidate of a `compress search`: SEARCH_HEAD's cells."""
    m, quality = c.result, quality_text(c.result)
    size = f"{m.bytes_on_disk / MB:,.2f} MiB" if m else f"{c.estimated_bytes / MB:,.2f} MiB (est.)"
    took = f"{c.seconds:.0f}" if c.seconds is not None else "-"
    return [str(i), c.label, size, quality, took, verdict_text(c)]


def verdict_text(c: Candidate) -> str:
    """The verdict as shown: "missed: <gates>", "met (winner, Pareto front)", "skipped: <why>"."""
    marks = ", ".join(x for x, on in (("winner", c.winner), ("Pareto front", c.front)) if on)
    return c.verdict + (f" ({marks})" if marks else "") + (f": {c.reason}" if c.reason else "")


def search_rows(report: Report) -> list[list[str]]:
    """`compress search`: every candidate in the order considered, with its verdict."""
    return [search_row(i, c) for i, c in enumerate(report.search, 1)]


def search_section(report: Report) -> list[str]:
    if not report.search:
        return []
    return [
        "## Search",
        "",
        "This checkpoint is the winner of `compress search`; every candidate considered, in order:",
        "",
        "| " + " | ".join(SEARCH_HEAD) + " |",
        "|" + "---|" * len(SEARCH_HEAD),
        *["| " + " | ".join(r) + " |" for r in search_rows(report)],
        "",
    ]


def markdown(report: Report, plot: str | None = None) -> str:
    lines = [
        f"# compress report: {report.model}",
        "",
        f"Task: {report.task}. Output: `{report.result.path}`. Created {report.created} by {report.tool}.",
        "",
        "| metric | base | result | change |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(report)],
        "",
        *gates_section(report),
        *search_section(report),
        "## How it was measured",
        "",
        *details(report),
        "",
        *layer_table(report),
        *sparsity_table(report),
        *expert_table(report),
        *training_section(report, plot),
        "## Environment",
        "",
        *[f"- {k}: {v}" for k, v in report.environment.items()],
        "",
    ]
    return "\n".join(lines)


def table(report: Report) -> Table:
    t = Table(title=f"{report.model} -> {report.result.path}", title_justify="left")
    for col, just in (("metric", "left"), ("base", "right"), ("result", "right"), ("change", "right")):
        t.add_column(col, justify=just)
    for row in rows(report):
        t.add_row(*row)
    return t


def gates_table(report: Report) -> Table:
    t = Table(title="gates: " + ("all passed" if report.passed else "FAILED"), title_justify="left")
    for col in ("gate", "measured (limit)", "result"):
        t.add_column(col)
    for g in report.gates:
        t.add_row(g.name, g.shown, "[green]pass[/]" if g.passed else "[red]FAIL[/]")
    return t


def gates_section(report: Report) -> list[str]:
    if not report.gates:
        return []
    return [
        "## Gates: " + ("all passed" if report.passed else "FAILED"),
        "",
        "| gate | measured (limit) | result |",
        "|---|---|---|",
        *[f"| {g.name} | {g.shown} | {'pass' if g.passed else 'FAIL'} |" for g in report.gates],
        "",
    ]


def _clean(value):
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def show(report: Report, console: Console) -> None:
    report = Report.model_validate(_clean(report.model_dump()))  # names and notes come from files
    console.print(table(report))
    for line in details(report):
        console.print(line, markup=False, highlight=False)
    if report.gates:
        console.print(gates_table(report))
