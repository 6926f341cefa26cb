"""The prune stage: check, calibrate, prune, and say what was done."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from rich.console import Console

from compress import calibrate
from compress.data import calibration
from compress.errors import UsageError
from compress.models import arch, experts
from compress.models.load import Loaded
from compress.primitives.masks import n_of_m_holds
from compress.prune.method import PruneMethod, Target
from compress.recipe import PruneStage
from compress.report.progress import progress_bar
from compress.report.schema import LayerError, StageRecord
from compress.stages import StageResult


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def run(stage: PruneStage, loaded: Loaded, device: str, console: Console) -> StageResult:
    start = time.perf_counter()
    before = _params(loaded.model)
    method = stage.method_class(stage.method_options(), Target(stage.share, stage.nm))
    do = _structured if method.structured else _unstructured
    result = do(stage, method, loaded, torch.device(device), console)
    result.record.settings.update({"parameters_before": before, "parameters_after": _params(loaded.model)})
    result.record.seconds = time.perf_counter() - start
    return result


def _structured(stage: PruneStage, method, loaded: Loaded, device, console) -> StageResult:
    model = loaded.model
    method.check_model(model)
    shown = ", ".join(f"{k}={v}" for k, v in method.settings().items())
    console.print(f"prune: {stage.method} ({shown})")
    batches, text, warnings = (
        calibration.batches(stage, loaded.tokenizer, console, loaded.model) if method.needs_data() else (None, None, [])
    )
    with progress_bar(console, "importance: decoder layers") as update:
        settings = method.run(model, batches, device, update)
    record = StageRecord(
        stage="prune",
        settings=settings,
        layers=len(arch.decoder_layers(model)),
        ignored=[],
        seconds=0.0,
        calibration=text,
        warnings=warnings,
    )
    return StageResult(record, [])


def _unstructured(stage: PruneStage, method: PruneMethod, loaded: Loaded, device, console) -> StageResult:
    model, nm, share = loaded.model, stage.nm, stage.share
    if stage.storage == "sparse":  # a compressed-tensors checkpoint, which transformers reads experts from one by one
        experts.check_rereadable(model)
    routers = experts.unfuse(model)  # per-expert linears, so the experts are pruned like any linear
    targets, ignore = arch.quant_targets(model, stage.ignore, routers)
    if nm:
        odd = next((n for n, lin in targets.items() if lin.in_features % nm[1]), None)
        if odd:
            raise UsageError(
                f"{stage.pattern}: {odd} has {targets[odd].in_features} inputs, not divisible by {nm[1]}; "
                "--ignore it or choose another M"
            )
    settings = {"method": stage.method, "sparsity": round(share, 4), "pattern": stage.pattern, "storage": stage.storage}
    console.print(f"prune: {stage.method}, {stage.pattern} at {share:.0%}, {len(targets)} layers")
    text, warnings, errors = None, [], []
    batches = None
    settings.update(method.settings())
    if note := arch.unreached_note(model):
        console.print(f"[yellow]warning:[/] {note}")
    if method.calibrated:
        batches, text, warnings = calibration.batches(stage, loaded.tokenizer, console, loaded.model)
    warnings = ([note] if note else []) + warnings
    with progress_bar(console, f"{stage.method}: decoder layers") as update, experts.calibrating(model):
        errors = prune_linears(model, targets, method, batches, device, update)
    if nm and not all(n_of_m_holds(m.weight, *nm) for m in targets.values()):
        raise RuntimeError(f"pruned weights break the {stage.pattern} pattern")
    zeros = sum(int((m.weight == 0).sum()) for m in targets.values())
    total = sum(m.weight.numel() for m in targets.values())
    record = StageRecord(
        stage="prune",
        settings=settings,
        layers=len(targets),
        ignored=ignore,
        seconds=0.0,
        calibration=text,
        warnings=warnings,
        layer_errors=[LayerError(layer=e.layer, method=e.method) for e in errors],
        layer_sparsity=[{"layer": n, "sparsity": float((m.weight == 0).float().mean())} for n, m in targets.items()],
        expert_tokens=experts.routed_tokens(model, len(batches or [])) or None,
    )
    sparsity = {
        "method": stage.method,
        "pattern": stage.pattern,
        "sparsity": round(zeros / total, 6),
        "storage": stage.storage,
        "format": "bitmask" if stage.storage == "sparse" else "dense",
        "targets": len(targets),
        "ignore": ignore,
    }
    return StageResult(
        record, sorted(targets), sparsity=sparsity, sparse_storage=sorted(targets) if stage.storage == "sparse" else []
    )


@torch.no_grad()
def prune_linears(
    model: torch.nn.Module,
    targets: dict[str, torch.nn.Linear],
    method: PruneMethod,
    batches: list[torch.Tensor] | None,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> list[calibrate.LayerError]:
    """Prune `targets` (full names) in place: linear by linear for a method without data, else
    layer by layer on the calibration batches. Per decoder layer, the output error it caused."""
    if not method.calibrated:
        for lin in targets.values():
            method.prune([lin], None)
        return []
    return calibrate.calibrate_linears(
        model,
        targets,
        batches,
        device,
        gather=lambda layer, lins: method.gather(model, layer, lins),
        treat=lambda lins, stats: [method.prune(lins, stats)] * len(lins),
        threads=method.threads,
        float_stream=method.float_stream,
        progress=progress,
    )
