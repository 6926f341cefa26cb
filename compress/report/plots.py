"""Plots for the Markdown and HTML reports, as PNG bytes (matplotlib, no display needed).

Each function returns None when the report has nothing to plot."""

from __future__ import annotations

import io
from pathlib import Path

from compress.report.schema import Measurement, Report

LOSS_CURVE = "loss_curve.png"
MB = 2**20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def loss_curve(report: Report) -> bytes | None:
    """The distill stages' training loss per step (and its parts)."""
    runs = [s.training for s in report.stages if s.training and s.training.curve]
    if not runs:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 3.5), dpi=100)
    for n, t in enumerate(runs):
        steps = [r["step"] for r in t.curve]
        for part in ("loss", "kd", "hidden", "lm"):
            if part in t.curve[0] and (part == "loss" or len(t.curve[0]) > 5):
                ax.plot(
                    steps,
                    [r[part] for r in t.curve],
                    label=part + (f" (stage {n})" if len(runs) > 1 else ""),
                    lw=1.2 if part == "loss" else 0.8,
                )
        if t.resumed_from:
            ax.axvline(t.resumed_from, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def write_loss_curve(report: Report, dest: Path) -> str | None:
    """The loss curve as a file beside report.md; its name."""
    png = loss_curve(report)
    if png is None:
        return None
    (dest / LOSS_CURVE).write_bytes(png)
    return LOSS_CURVE


def layer_errors(report: Report) -> bytes | None:
    """Per decoder layer, the relative output error of each stage's method (and plain RTN)."""
    stages = [s for s in report.stages if s.layer_errors]
    if not stages:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 3.5), dpi=100)
    for n, s in enumerate(stages):
        tag = f" ({s.stage} {n})" if len(stages) > 1 else ""
        layers = [e.layer for e in s.layer_errors]
        if any(e.rtn is not None for e in s.layer_errors):
            ax.plot(layers, [e.rtn for e in s.layer_errors], "o--", ms=3, lw=1, label=f"rtn (min/max){tag}")
        ax.plot(layers, [e.method for e in s.layer_errors], "o-", ms=3, lw=1.2, label=f"{s.settings['method']}{tag}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative output error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def quality(m: Measurement) -> tuple[str, float] | None:
    """The quality axis of a measurement: perplexity (decoders) or embedding cosine (encoders)."""
    if m.perplexity is not None:
        return "perplexity (lower is better)", m.perplexity.value
    if m.similarity is not None:
        return "embedding cosine to the base (higher is better)", m.similarity.mean
    return None


def size_quality(report: Report, candidates: list[tuple[str, Measurement]] = ()) -> bytes | None:
    """Size on disk against quality: the base, the result and any other candidates measured."""
    points = [(label, m) for label, m in [("base", report.base), ("result", report.result), *candidates] if m]
    if report.base is not None and report.base.similarity is None and report.result.similarity is not None:
        points = [(label, m) for label, m in points if label != "base"]  # the base's cosine to itself is 1
    points = [(label, m, quality(m)) for label, m in points]
    points = [p for p in points if p[2] is not None]
    if not points:
        return None
    fig, ax = _pyplot().subplots(figsize=(6, 3.5), dpi=100)
    for label, m, (_, q) in points:
        color = {"base": "tab:grey", "result": "tab:blue"}.get(label, "tab:orange")
        ax.scatter([m.bytes_on_disk / MB], [q], s=40, color=color, zorder=3)
        ax.annotate(label, (m.bytes_on_disk / MB, q), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel(points[0][2][0])
    ax.grid(alpha=0.3)
    return _png(fig)


def latency(report: Report) -> bytes | None:
    """Tokens/s of base and result, median with the range over the interleaved rounds."""
    ms = [(label, m.latency) for label, m in (("base", report.base), ("result", report.result)) if m and m.latency]
    if not ms:
        return None
    kinds = [("prefill", "prefill_tokens_per_s", "prefill_range")]
    if all(lt.decode_tokens_per_s for _, lt in ms):
        kinds.append(("decode", "decode_tokens_per_s", "decode_range"))
    fig, axes = _pyplot().subplots(1, len(kinds), figsize=(3.5 * len(kinds), 3.2), dpi=100, squeeze=False)
    for ax, (name, rate, rng) in zip(axes[0], kinds):
        values = [getattr(lt, rate) for _, lt in ms]
        ranges = [getattr(lt, rng) or [v, v] for (_, lt), v in zip(ms, values)]
        err = [[v - r[0] for v, r in zip(values, ranges)], [r[1] - v for v, r in zip(values, ranges)]]
        ax.bar([label for label, _ in ms], values, yerr=err, capsize=6, color=["tab:grey", "tab:blue"][: len(ms)])
        ax.set_title(f"{name} tokens/s (batch 1)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)
