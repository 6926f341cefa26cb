"""Plots for the Markdown/HTML report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from compress.report.schema import Report

LOSS_CURVE = "loss_curve.png"


def loss_curve(report: Report, dest: Path) -> str | None:
    """The distill stages' training loss per step (and its parts) as a PNG; its file name."""
    runs = [s.training for s in report.stages if s.training and s.training.curve]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
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
    fig.tight_layout()
    fig.savefig(dest / LOSS_CURVE)
    plt.close(fig)
    return LOSS_CURVE
