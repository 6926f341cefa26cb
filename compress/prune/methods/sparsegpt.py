"""SparseGPT (Frantar & Alistarh, 2023): choose each block's mask from the inverse Hessian of
the linear's inputs and update the kept weights to make up for the pruned ones."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.calibrate import Gather
from compress.primitives.gptq import INNER
from compress.primitives.sparsegpt import sparsegpt
from compress.prune.method import PruneMethod


class SparseGPTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dampening: float = Field(
        0.01, gt=0, le=1, description="SparseGPT: dampening, a fraction of the Hessian's mean diagonal"
    )
    block_size: int = Field(128, ge=8, description="SparseGPT: columns per lazy update and mask selection")


class SparseGPT(PruneMethod):
    name = "sparsegpt"
    Options = SparseGPTOptions
    threads = 2

    @classmethod
    def check(cls, stage) -> None:
        nm = stage.nm
        if nm and (INNER % nm[1] or stage.block_size % nm[1]):
            raise ValueError(
                f"sparsegpt with {stage.pattern}: M must divide {INNER} and the block size ({stage.block_size})"
            )

    def gather(self, model, layer, targets) -> Gather:
        return Gather(hessian=True)

    def prune(self, lins, stats) -> None:
        """Linears that read one input are pruned stacked: rows are independent and each linear
        keeps its own share, so this is exact, with one factorization."""
        o, t = self.options, self.target
        w = torch.cat([lin.weight for lin in lins])
        pruned, mask = sparsegpt(
            w, stats.hessian.H, t.sparsity, t.nm, o.block_size, o.dampening, rows=[lin.out_features for lin in lins]
        )
        row = 0
        for lin in lins:
            rows = slice(row, row + lin.out_features)
            row += lin.out_features
            lin.weight.data = torch.where(mask[rows], pruned[rows], 0).to(lin.weight.dtype)
