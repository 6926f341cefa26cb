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
        v, what = None, ""
        if base and base.latency and res.latency:
            use_decode = base.latency.decode_tokens_per_s and res.latency.decode_tokens_per_s
            what = "decode" if use_decode else "prefill"
            key = "decode_tokens_per_s" if use_decode else "prefill_tokens_per_s"
            v = _ratio(getattr(res.latency, key), getattr(base.latency, key))
        add(
            "min_speedup",
            gates.min_speedup,
            v,
            v is not None and v >= gates.min_speedup,
            f"{v:.2f}x {what} (limit {gates.min_speedup}x)" if v is not None else "",
        )
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
