"""Gates: the recipe's budgets checked against the measured report."""

from __future__ import annotations

from compress.recipe import Gates
from compress.report.schema import GateResult, Report

MB = 2**20


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def check(gates: Gates, report: Report) -> list[GateResult]:
    base, res, out = report.base, report.result, []

    def add(name: str, limit: float, value: float | None, ok: bool, shown: str) -> None:
        out.append(
            GateResult(
                name=name,
                limit=limit,
                value=value,
                passed=value is not None and ok,
                shown=shown if value is not None else "not measured",
            )
        )

    if gates.max_ppl_increase is not None:
        v = None
        if base and base.perplexity and res.perplexity:
            v = res.perplexity.value / base.perplexity.value - 1
        add(
            "max_ppl_increase",
            gates.max_ppl_increase,
            v,
            v is not None and v <= gates.max_ppl_increase,
            f"{v:+.2%} (limit {gates.max_ppl_increase:+.2%})" if v is not None else "",
        )
    if gates.max_kl_divergence is not None:
        v = res.divergence.kl_mean if res.divergence else None
        add(
            "max_kl_divergence",
            gates.max_kl_divergence,
            v,
            v is not None and v <= gates.max_kl_divergence,
            f"{v:.4f} nats (limit {gates.max_kl_divergence})" if v is not None else "",
        )
    if gates.min_embedding_similarity is not None:
        v = res.similarity.mean if res.similarity else None
        add(
            "min_embedding_similarity",
            gates.min_embedding_similarity,
            v,
            v is not None and v >= gates.min_embedding_similarity,
            f"{v:.4f} (limit {gates.min_embedding_similarity})" if v is not None else "",
        )
    if gates.max_size_ratio is not None:
        v = _ratio(res.bytes_on_disk, base.bytes_on_disk if base else None)
        add(
            "max_size_ratio",
            gates.max_size_ratio,
            v,
            v is not None and v <= gates.max_size_ratio,
            f"{v:.3f}x (limit {gates.max_size_ratio}x)" if v is not None else "",
        )
    if gates.min_speedup is not None:
        v, ok, shown = None, False, ""
        sp = report.speed
        if sp is not None:
            which = "decode" if sp.decode is not None else "prefill"
            v, (lo, hi) = getattr(sp, which), getattr(sp, f"{which}_range")
            # A busy machine: pass only if every round pair clears the limit, never on a lucky median.
            ok = lo >= gates.min_speedup if sp.noisy else v >= gates.min_speedup
            shown = f"{v:.2f}x {which}, rounds {lo:.2f}-{hi:.2f}" + (" (noisy)" if sp.noisy else "")
            shown += f" (limit {gates.min_speedup}x)"
        add("min_speedup", gates.min_speedup, v, ok, shown)
    if gates.max_task_drop is not None:
        v, shown = None, ""
        drops = {
            name: (base.tasks[name].value - score.value) * 100
            for name, score in res.tasks.items()
            if base is not None and name in base.tasks
        }
        if drops:
            worst = max(drops, key=drops.get)
            v = drops[worst]
            shown = f"{v:+.1f} points on {worst} (limit {gates.max_task_drop})"
        add("max_task_drop", gates.max_task_drop, v, v is not None and v <= gates.max_task_drop, shown)
    if gates.max_peak_memory is not None:
        v = res.peak_rss_bytes
        add(
            "max_peak_memory",
            gates.max_peak_memory,
            v,
            v is not None and v <= gates.max_peak_memory,
            f"{v / MB:.0f} MiB (limit {gates.max_peak_memory / MB:.0f} MiB)" if v is not None else "",
        )
    return out
