"""Training sequences and the order they are read in.

The text is packed into windows of L tokens. Which windows optimizer step s, micro-batch m
and process r read is a pure function of (seed, s, m, r), so a resumed run reads exactly
what the killed run would have read next, and N processes with accumulation K read the
same windows per step as 1 process with accumulation N*K.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from compress.data import calibration
from compress.errors import UsageError


@dataclass(frozen=True)
class TrainData:
    windows: torch.Tensor  # [N, L] token ids
    description: str


@dataclass(frozen=True)
class Layout:
    batch_size: int  # windows per micro-batch, per process
    grad_accum: int  # micro-batches per optimizer step, per process
    world: int = 1  # processes

    @property
    def per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world


def load(
    tokenizer,
    dataset: str,
    text_column: str,
    seq_len: int,
    layout: Layout,
    count: int | None = None,
    teacher: torch.nn.Module | None = None,
) -> TrainData:
    """Training text (the built-in text's calibration half: never the evaluation half): all the windows a text holds,
    or `count`; `generated` (alone or in a mix) is sampled from the teacher, `count` windows of it."""
    wins, desc, warnings = calibration.windows(dataset, text_column, tokenizer, seq_len, count, teacher)
    if len(wins) < layout.per_step:
        raise UsageError(
            f"training text ({desc}) holds {len(wins)} windows of {seq_len} tokens, fewer than one "
            f"optimizer step needs ({layout.batch_size} x {layout.grad_accum} accumulation x {layout.world} processes)"
        )
    return TrainData(wins, desc)


@lru_cache(maxsize=4)
def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def micro_batch(data: TrainData, layout: Layout, seed: int, step: int, micro: int, rank: int = 0) -> torch.Tensor:
    """[B, L] windows for this optimizer step, micro-batch and process; each epoch reads every
    window once, in a shuffled order."""
    n = len(data.windows)
    start = step * layout.per_step + (micro * layout.world + rank) * layout.batch_size
    positions = range(start, start + layout.batch_size)
    idx = [int(_order(n, seed, p // n)[p % n]) for p in positions]
    return data.windows[idx]
