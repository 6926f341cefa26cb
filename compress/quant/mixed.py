"""Mixed precision to a bit budget (`--target-bits`): how much each linear's width costs the model, measured on
the calibration text, then the widths that meet the average stored bits a weight at the least summed cost.

Cost of linear L at width b: the squared error of its decoder layer's output relative to that output, per token
and averaged over tokens (`token_error`), when L alone is rounded to nearest on b bits (min/max) and the rest of
the layer stays float, on the first calibration batches. The residual stream carries every layer's error on to the
end, so these add up over linears to first order; a method (GPTQ, ...) lowers every width's error afterwards,
roughly alike.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress import calibrate
from compress.calibrate import LayerInputs
from compress.errors import UsageError
from compress.models import arch
from compress.models.offload import LayerStore
from compress.primitives.qparams import Grid, fake_quantize
from compress.quant.schemes import grid_bits

# Each cost on this many calibration tokens: SmolLM2 runs a layer 5 widths x 7 linears x 30 times, about 60 s on 2
# cores (benchmarks/RESULTS.md, "Mixed precision").
SENSITIVITY_TOKENS = 1024


@dataclass(frozen=True)
class Allocation:
    """Each linear's grid (full names) and the average stored bits a weight it reaches."""

    grids: dict[str, Grid]
    target: float  # the asked average stored bits a weight
    bits: float  # the average reached

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for g in self.grids.values():
            out[g.bits] = out.get(g.bits, 0) + 1
        return dict(sorted(out.items()))


def check_target(target: float, grids: dict[int, Grid], widths: dict[int, int]) -> None:
    """The budget must lie between every linear at the fewest bits and every linear at the most (widths: weights
    per input width)."""
    total = sum(widths.values())
    fewest, most = min(grids), max(grids)

    def average(b: int) -> float:
        return sum(grid_bits(grids[b], k) * n for k, n in widths.items()) / total if total else 0.0

    low, high = average(fewest), average(most)
    if not low <= target <= high:
        raise UsageError(
            f"--target-bits {target:g} is outside what widths {fewest} to {most} store here: {low:.2f} to "
            f"{high:.2f} bits a weight (scales and zero points included)"
        )


@torch.no_grad()
def sensitivity(
    model: torch.nn.Module,
    layers: dict[str, torch.nn.Linear],
    grids: dict[int, Grid],
    batches: list[torch.Tensor],
    device: torch.device,
    store: LayerStore | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[int, float]]:
    """Per linear (full names) and width: the cost described above. The decoder layers run float on their float
    inputs; linears outside them get none (they keep the scheme's width)."""
    prefix = arch.decoder_prefix(model)
    n, tokens = 0, 0
    while n < len(batches) and tokens < SENSITIVITY_TOKENS:
        tokens += batches[n].numel()
        n += 1
    out: dict[str, dict[int, float]] = {}

    def measure(i: int, module: torch.nn.Module, inputs: LayerInputs) -> None:
        own = f"{prefix}.{i}."
        ref = calibrate.run_layer(module, inputs)
        for name, lin in ((n, m) for n, m in layers.items() if n.startswith(own)):
            saved = lin.weight.data
            costs = {}
            for bits, grid in grids.items():
                lin.weight.data = fake_quantize(saved.float(), grid).to(saved.dtype)
                costs[bits] = token_error(ref, calibrate.run_layer(module, inputs))
            lin.weight.data = saved
            # more bits never cost more: a measured inversion is noise at these tiny errors
            for lo, hi in zip(sorted(costs), sorted(costs)[1:]):
                costs[hi] = min(costs[hi], costs[lo])
            out[name] = costs

    calibrate.layer_by_layer(model, batches[:n], device, measure, progress, store=store)
    return out


def token_error(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Mean over tokens of the squared relative error of each token's output vector. Per token, not over the
    whole batch: a few tokens carry activations hundreds of times larger than the rest (attention sinks) and
    would decide a batch-wide ratio alone (measured: ranked by it, SmolLM2's middle layers looked cheap at 3 bits,
    and 4.8 bits a weight scored worse than all 4-bit, perplexity 19.91 against 19.72)."""
    num, n = 0.0, 0
    for r, g in zip(ref, got):
        r, g = r.float().flatten(0, -2), g.float().flatten(0, -2)  # [T, H]
        num += float(((r - g).pow(2).sum(-1) / r.pow(2).sum(-1).clamp_min(1e-12)).sum())
        n += r.shape[0]
    return num / max(n, 1)


def allocate(
    costs: dict[str, dict[int, float]], sizes: dict[str, tuple[int, int]], grids: dict[int, Grid], target: float
) -> dict[str, int]:
    """The width of each linear (sizes: [out, in] features) whose average stored bits a weight stay within `target`,
    at the least summed cost: every linear starts at the fewest bits, then the upgrade that buys the most cost per
    stored bit is taken while it fits (a greedy knapsack; each step may skip widths, which keeps it on the lower
    hull of each linear's cost curve)."""
    total = sum(o * i for o, i in sizes.values())
    budget = target * total

    def stored(name: str, bits: int) -> float:
        o, i = sizes[name]
        return grid_bits(grids[bits], i) * o * i

    widths = sorted(grids)
    choice = {n: widths[0] for n in costs}
    used = sum(stored(n, b) for n, b in choice.items())

    def best_step(name: str, below: int | None = None) -> tuple[float, int] | None:
        cur = choice[name]
        steps = [
            ((costs[name][cur] - costs[name][b]) / (stored(name, b) - stored(name, cur)), b)
            for b in widths
            if cur < b < (below or widths[-1] + 1)
        ]
        steps = [s for s in steps if s[0] > 0]
        return max(steps) if steps else None

    heap = []
    for name in choice:
        if (s := best_step(name)) is not None:
            heapq.heappush(heap, (-s[0], name, s[1]))
    while heap:
        _, name, bits = heapq.heappop(heap)
        extra = stored(name, bits) - stored(name, choice[name])
        if used + extra <= budget:
            choice[name], used = bits, used + extra
            s = best_step(name)
        else:  # too big: a smaller step of this linear may still fit
            s = best_step(name, below=bits)
        if s is not None:
            heapq.heappush(heap, (-s[0], name, s[1]))
    return choice


def plan(
    model: torch.nn.Module,
    layers: dict[str, torch.nn.Linear],
    base: Grid,
    widths: tuple[int, ...],
    target: float,
    batches: list[torch.Tensor],
    device: torch.device,
    store: LayerStore | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Allocation:
    """Measure and allocate: linears outside the decoder layers keep `base`; the rest get one of `widths`, each
    on `base`'s group size and symmetry."""
    grids = {b: Grid(b, "int", base.symmetric, base.group_size) for b in sorted(set(widths))}
    inside = arch.decoder_prefix(model) + "."
    sizes = {n: (m.out_features, m.in_features) for n, m in layers.items() if n.startswith(inside)}
    check_target(target, grids, _columns(sizes))
    costs = sensitivity(model, layers, grids, batches, device, store, progress)
    choice = allocate(costs, sizes, grids, target)
    chosen = {n: grids[b] for n, b in choice.items()}
    chosen.update({n: base for n in layers if n not in chosen})
    total = sum(m.weight.numel() for m in layers.values())
    reached = sum(grid_bits(chosen[n], m.in_features) * m.weight.numel() for n, m in layers.items()) / total
    return Allocation(chosen, target, reached)


def _columns(sizes: dict[str, tuple[int, int]]) -> dict[int, int]:
    """Weights per input width, which is all the stored bits a weight depend on."""
    out: dict[int, int] = {}
    for o, i in sizes.values():
        out[i] = out.get(i, 0) + o * i
    return out
