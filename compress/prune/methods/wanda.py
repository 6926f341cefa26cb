"""Wanda (Sun et al., 2023): score |W_ij| * ||x_j|| and keep the best of each output row, on
the inputs the already pruned layers produce."""

from __future__ import annotations

from compress.calibrate import Gather
from compress.prune.method import PruneMethod, apply_mask


class Wanda(PruneMethod):
    name = "wanda"

    def gather(self, model, layer, targets) -> Gather:
        return Gather()  # the sum of x^2 is always gathered

    def prune(self, lins, stats) -> None:
        norm = stats.sq_sum.sqrt()  # [I] ||x_j|| over the calibration tokens
        for lin in lins:
            apply_mask(lin, self.target.mask(lin.weight.float().abs() * norm, per_row=True))
