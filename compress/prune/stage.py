"""The prune stage of the runner: check, calibrate, prune, and say what was done."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.progress import Progress, TimeElapsedColumn

from compress.calibrate import decoder_layers
from compress.errors import UsageError
from compress.primitives.gptq import INNER
from compress.models import arch
from compress.models.load import Loaded
from compress.primitives.masks import n_of_m_holds, parse_pattern
from compress.prune import structured, unstructured
from compress.recipe import PruneStage
from compress.report.schema import StageRecord


@dataclass
class Outcome:
    sparsity: dict | None = None  # what config.json records (unstructured methods)
    linears: list[str] = field(default_factory=list)  # the pruned linears


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _progress(console: Console, what: str):
    """A transient progress bar and its update callback."""
    bar = Progress(*Progress.get_default_columns(), TimeElapsedColumn(), console=console, transient=True)
    task = bar.add_task(what, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def run(stage: PruneStage, loaded: Loaded, device: str, console: Console, batches_for) -> tuple[StageRecord, Outcome]:
    """batches_for(stage) -> (calibration batches, description, warnings)."""
    start = time.perf_counter()
    before = _params(loaded.model)
    do = _structured if stage.method == "structured" else _unstructured
    settings, layers, extra, outcome = do(stage, loaded.model, torch.device(device), console, batches_for)
    settings.update({"parameters_before": before, "parameters_after": _params(loaded.model)})
    record = StageRecord(stage="prune", settings=settings, layers=layers, ignored=outcome.sparsity["ignore"] if outcome.sparsity else [],
                         seconds=time.perf_counter() - start, **extra)
    return record, outcome


def _structured(stage: PruneStage, model, device, console, batches_for) -> tuple[dict, int, dict, Outcome]:
    plan = structured.Plan(stage.drop_layers, stage.mlp_keep, stage.heads_keep)
    structured.check(model, plan)
    settings = {"method": "structured", **{k: v for k, v in vars(plan).items() if v is not None}}
    console.print(f"prune: structured ({', '.join(f'{k}={v}' for k, v in settings.items() if k != 'method')})")
    imp, extra = structured.Importance(), {}
    if not isinstance(stage.drop_layers, list) or stage.mlp_keep or stage.heads_keep:  # importance needs data
        batches, extra["calibration"], extra["warnings"] = batches_for(stage)
        bar, update = _progress(console, "importance: decoder layers")
        with bar:
            imp = structured.measure_importance(model, batches, device, update)
        settings["layer_importance"] = "block influence 1 - cos(in, out): " + ", ".join(f"{v:.3f}" for v in imp.layers)
    settings.update(structured.apply(model, plan, imp))
    return settings, len(decoder_layers(model)), extra, Outcome()


def _unstructured(stage: PruneStage, model, device, console, batches_for) -> tuple[dict, int, dict, Outcome]:
    nm = parse_pattern(stage.pattern)
    targets, ignore = arch.quant_targets(model, stage.ignore)
    if nm:
        _check_n_of_m(stage, nm, targets)
    sparsity = (1 - nm[0] / nm[1]) if nm else stage.sparsity
    opts = unstructured.Options(stage.method, sparsity, nm, stage.dampening, stage.block_size)
    settings = {"method": stage.method, "sparsity": round(sparsity, 4), "pattern": stage.pattern, "storage": stage.storage}
    console.print(f"prune: {stage.method}, {stage.pattern} at {sparsity:.0%}, {len(targets)} layers")
    extra: dict = {}
    if stage.method == "magnitude":
        unstructured.magnitude(targets, opts)
    else:
        batches, extra["calibration"], extra["warnings"] = batches_for(stage)
        if stage.method == "sparsegpt":
            settings.update({"dampening": stage.dampening, "block_size": stage.block_size})
        bar, update = _progress(console, f"{stage.method}: decoder layers")
        with bar:
            errs = unstructured.apply(model, targets, batches, opts, device, update)
        extra["layer_errors"] = [{"layer": e["layer"], "method": e["error"]} for e in errs]
    if nm and not all(n_of_m_holds(m.weight, *nm) for m in targets.values()):
        raise RuntimeError(f"pruned weights break the {stage.pattern} pattern")
    extra["layer_sparsity"] = unstructured.sparsity_of(targets)
    zeros = sum(int((m.weight == 0).sum()) for m in targets.values())
    total = sum(m.weight.numel() for m in targets.values())
    recorded = {"method": stage.method, "pattern": stage.pattern, "sparsity": round(zeros / total, 6), "storage": stage.storage,
                "format": "bitmask" if stage.storage == "sparse" else "dense", "targets": len(targets), "ignore": ignore}
    return settings, len(targets), extra, Outcome(recorded, sorted(targets))


def _check_n_of_m(stage: PruneStage, nm: tuple[int, int], targets: dict[str, torch.nn.Linear]) -> None:
    m = nm[1]
    odd = next((n for n, lin in targets.items() if lin.in_features % m), None)
    if odd:
        raise UsageError(f"{stage.pattern}: {odd} has {targets[odd].in_features} inputs, not divisible by {m}; --ignore it or choose another M")
    if stage.method == "sparsegpt" and (INNER % m or stage.block_size % m):
        raise UsageError(f"sparsegpt with {stage.pattern}: M must divide {INNER} and the block size ({stage.block_size})")
