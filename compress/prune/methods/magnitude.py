"""Magnitude pruning: each linear keeps its largest weights (a share of the whole matrix, or N
of each M); no data."""

from __future__ import annotations

from compress.prune.method import PruneMethod, apply_mask


class Magnitude(PruneMethod):
    name = "magnitude"
    calibrated = False
    working_memory = 0.25

    def prune(self, lins, stats) -> None:
        for lin in lins:
            apply_mask(lin, self.target.mask(lin.weight.float().abs(), per_row=False))
