"""Magnitude, Wanda and SparseGPT pruning, unstructured or N:M, one decoder layer at a time.

Magnitude needs no data. Wanda (Sun et al., 2023) scores |W_ij| * ||x_j|| and keeps the best
of each output row; SparseGPT reconstructs each linear from its Hessian. Both calibrate on a
layer's inputs as the already pruned layers produce them, like GPTQ.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from compress import calibrate
from compress.primitives.hessian import Hessian
from compress.primitives.masks import keep_n_of_m, keep_top
from compress.primitives.sparsegpt import sparsegpt

THREADS = 2
ERROR_TOKENS = 2048  # each layer's output error is reported on the first batches holding this many tokens


@dataclass(frozen=True)
class Options:
    method: str  # magnitude | wanda | sparsegpt
    sparsity: float
    nm: tuple[int, int] | None  # (N kept, M) or None for unstructured
    dampening: float = 0.01
    block_size: int = 128


def mask_for(w: torch.Tensor, score: torch.Tensor, opts: Options, per_row: bool) -> torch.Tensor:
    if opts.nm:
        return keep_n_of_m(score, *opts.nm)
    return keep_top(score, opts.sparsity, per_row)


@torch.no_grad()
def prune_weight(lin: torch.nn.Linear, mask: torch.Tensor) -> None:
    lin.weight.data = torch.where(mask.to(lin.weight.device), lin.weight, 0).to(lin.weight.dtype)


@torch.no_grad()
def magnitude(layers: dict[str, torch.nn.Linear], opts: Options) -> None:
    """Each linear keeps its largest weights (a share of the whole matrix, or N of each M)."""
    for lin in layers.values():
        prune_weight(lin, mask_for(lin.weight, lin.weight.float().abs(), opts, per_row=False))


def _prune_together(lins: list[torch.nn.Linear], h: Hessian | None, sq_sum: torch.Tensor | None, opts: Options) -> None:
    """Linears that read one input: Wanda scores each alone; SparseGPT prunes them stacked
    (rows are independent, each linear keeps its own share: exact, one factorization)."""
    if opts.method == "wanda":
        norm = sq_sum.sqrt()  # [I] ||x_j|| over the calibration tokens
        for lin in lins:
            prune_weight(lin, mask_for(lin.weight, lin.weight.float().abs() * norm, opts, per_row=True))
        return
    w = torch.cat([lin.weight for lin in lins])
    pruned, mask = sparsegpt(w, h.H, opts.sparsity, opts.nm, opts.block_size, opts.dampening, rows=[lin.out_features for lin in lins])
    row = 0
    for lin in lins:
        rows = slice(row, row + lin.out_features)
        row += lin.out_features
        lin.weight.data = torch.where(mask[rows], pruned[rows], 0).to(lin.weight.dtype)


def apply(
    model: torch.nn.Module,
    layers: dict[str, torch.nn.Linear],
    batches: list[torch.Tensor],
    opts: Options,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Prune `layers` (full names) with calibration, layer by layer. Returns, per decoder
    layer, the relative output error the pruning caused."""
    blocks = calibrate.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    n_err = next((k + 1 for k in range(len(batches)) if sum(b.numel() for b in batches[: k + 1]) >= ERROR_TOKENS), len(batches))
    report: list[dict] = []
    refs: dict[int, list[torch.Tensor]] = {}
    done: set[str] = set()

    def calibrate_layer(i: int, layer: torch.nn.Module, inputs: calibrate.LayerInputs) -> None:
        own = f"{prefix}.{i}."
        targets = {n[len(own):]: m for n, m in layers.items() if n.startswith(own)}
        shared = calibrate.SharedReaders()
        hess = {n: Hessian(m.in_features, device) for n, m in targets.items()} if opts.method == "sparsegpt" else {}
        sq = {n: torch.zeros(m.in_features, device=device) for n, m in targets.items()}

        def observe(name: str, x: torch.Tensor) -> None:
            if shared.reader(name, x) != name:
                return
            if hess:
                hess[name].add(x)
            else:
                sq[name] += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)

        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: observe(n, args[0])) for n, m in targets.items()]
        hooks.append(layer.register_forward_pre_hook(lambda mod, args: shared.next_batch()))
        try:
            refs[i] = calibrate.run_layer(layer, inputs)[:n_err]
        finally:
            for h in hooks:
                h.remove()
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(lambda item: _prune_together([targets[n] for n in item[1]], hess.get(item[0]), sq[item[0]], opts),
                          shared.groups(targets).items()))
        done.update(own + n for n in targets)

    def layer_done(i: int, outputs: list[torch.Tensor]) -> None:
        report.append({"layer": i, "error": calibrate.relative_error(refs.pop(i), outputs[:n_err])})

    calibrate.layer_by_layer(model, batches, device, calibrate_layer, progress, on_outputs=layer_done)
    missing = set(layers) - done
    if missing:
        raise RuntimeError(f"layers outside the decoder blocks are not pruned: {sorted(missing)[:3]}")
    return report


def sparsity_of(layers: dict[str, torch.nn.Linear]) -> list[dict]:
    """Per linear: the share of exactly-zero weights."""
    return [{"layer": n, "sparsity": float((m.weight == 0).float().mean())} for n, m in layers.items()]
