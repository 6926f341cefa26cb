"""Gates: the recipe's budgets checked against the measured report."""

from __future__ import annotations

from compress.recipe import Gates
from compress.report.schema import GateResult, Report

MB = 2**20


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ppl_increases(report: Report) -> list[tuple[float | None, str | None]]:
    """(relative perplexity increase, text) on the evaluation text and on each of `evaluate.also`'s."""
    base, res = report.base, report.result
    if not base or not base.perplexity or not res.perplexity:
        return []
    got = [(res.perplexity.value / base.perplexity.value - 1, res.perplexity.text)]
    for b, r in zip(base.domains, res.domains):
        got.append((r.perplexity.value / b.perplexity.value - 1, r.perplexity.text))
    return got


def _worst(values: list[tuple[float | None, str | None]]) -> tuple[float | None, str]:
    """The largest measured value, and (when several texts were measured) which text it was on."""
    measured = [(v, t) for v, t in values if v is not None]
    if not measured:
        return None, ""
    v, text = max(measured, key=lambda x: x[0])
    return v, f" on {text.split(';')[0]}" if len(measured) > 1 else ""


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
        v, where = _worst(_ppl_increases(report))
        add(
            "max_ppl_increase",
            gates.max_ppl_increase,
            v,
            v is not None and v <= gates.max_ppl_increase,
            f"{v:+.2%}{where} (limit {gates.max_ppl_increase:+.2%})" if v is not None else "",
        )
    if gates.max_kl_divergence is not None:
        kls = [(res.divergence and res.divergence.kl_mean, res.perplexity and res.perplexity.text)]
        kls += [(d.divergence and d.divergence.kl_mean, d.perplexity.text) for d in res.domains]
        v, where = _worst(kls)
        add(
            "max_kl_divergence",
            gates.max_kl_divergence,
            v,
            v is not None and v <= gates.max_kl_divergence,
            f"{v:.4f} nats{where} (limit {gates.max_kl_divergence})" if v is not None else "",
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
