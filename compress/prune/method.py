"""The interface a pruning method implements: unstructured methods choose a mask per linear
(a share of its weights, or N of every M inputs); structured ones reshape the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.calibrate import Gather, InputStats
from compress.method import Method
from compress.primitives.masks import keep_n_of_m, keep_top


@dataclass(frozen=True)
class Target:
    """The sparsity asked: a share of each linear's weights, or N kept of every M (nm)."""

    sparsity: float
    nm: tuple[int, int] | None = None

    def mask(self, score: torch.Tensor, per_row: bool) -> torch.Tensor:
        """score [O, I] -> True where a weight stays."""
        if self.nm:
            return keep_n_of_m(score, *self.nm)
        return keep_top(score, self.sparsity, per_row)


class PruneMethod(Method):
    structured = False  # True: reshapes the model (`run`), no sparsity pattern or storage
    shrinks = "the tensors themselves shrink"  # a structured method: what goes instead of single weights

    @classmethod
    def check(cls, stage) -> None:
        if cls.structured and (stage.pattern != "unstructured" or stage.storage != "dense"):
            raise ValueError(f"--method {cls.name} takes no pattern or sparse storage: {cls.shrinks}")

    def __init__(self, options, target: Target | None = None):
        super().__init__(options)
        self.target = target

    def gather(self, model: torch.nn.Module, layer: torch.nn.Module, targets: dict[str, torch.nn.Linear]) -> Gather:
        return Gather()

    def prune(self, lins: list[torch.nn.Linear], stats: InputStats | None) -> None:
        """Zero weights of linears that read one input (stats: None for a method without data)."""
        raise NotImplementedError


@torch.no_grad()
def apply_mask(lin: torch.nn.Linear, mask: torch.Tensor) -> None:
    lin.weight.data = torch.where(mask.to(lin.weight.device), lin.weight, 0).to(lin.weight.dtype)
