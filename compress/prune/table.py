"""The pruning methods, by the name recipes and the CLI use. Adding one: a file in methods/,
one line here, its test."""

from __future__ import annotations

from compress.prune.method import PruneMethod
from compress.prune.methods import experts, magnitude, sparsegpt, structured, wanda

METHODS: dict[str, type[PruneMethod]] = {
    m.name: m
    for m in (
        magnitude.Magnitude,
        wanda.Wanda,
        sparsegpt.SparseGPT,
        structured.Structured,
        experts.Experts,
    )
}
