"""The quantize stage: scheme resolved, the method run (layer by layer through the calibration
engine, or weight by weight for methods without data), each layer compressed into the
compressed-tensors format as soon as it is final."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch
from rich.console import Console

from compress import calibrate, heap
from compress.calibrate import LayerInputs
from compress.data import calibration
from compress.errors import CompressError, UsageError
from compress.formats import bnb_nf4, compressed_tensors as ct_format
from compress.models import arch, experts
from compress.models.load import Loaded
from compress.models.offload import InMemory, LayerStore, OnDisk
from compress.primitives.qparams import QuantizedWeight, dequantize, fake_quantize
from compress.quant import mixed, schemes
from compress.quant.method import QuantMethod, Target
from compress.quant.methods.rtn import RTN
from compress.recipe import QuantizeStage
from compress.report.progress import progress_bar
from compress.report.schema import LayerError, StageRecord
from compress.stages import StageResult


def run(stage: QuantizeStage, loaded: Loaded, device: str, console: Console, keep_zeros: bool) -> StageResult:
    model = loaded.model
    start = time.perf_counter()
    moe = bool(experts.fused_modules(model))
    if moe and schemes.SCHEMES[stage.scheme].grid == "nf4":  # per-expert NF4 linears against fused experts on load
        raise UsageError(
            "nf4 on a mixture of experts: transformers loads its experts fused, which bitsandbytes does not "
            "quantize, so per-expert NF4 weights would not load; use --scheme w4a16"
        )
    experts.check_rereadable(model)
    routers = experts.unfuse(model)  # per-expert linears, so every method reaches the experts
    layers, ignore = arch.quant_targets(model, stage.ignore, routers)
    try:
        symmetric = schemes.symmetric_for(stage.scheme, stage.symmetric, moe or stage.target_bits is not None)
        if stage.target_bits is not None and not symmetric:  # measured: a tiny llama at 4/5/8 bits, 2.7 dB SQNR
            raise UsageError(
                "--target-bits with zero points: transformers 5.24 de-quantizes the 5- and 8-bit linears of such "
                "a checkpoint wrongly on load; drop --no-symmetric (mixed widths are symmetric by default)"
            )
        scheme = schemes.resolve(
            stage.scheme, stage.group_size, symmetric, {n: m.in_features for n, m in layers.items()}
        )
    except schemes.SchemeError as exc:
        raise UsageError(str(exc)) from None
    if moe:
        experts.check_loadable(scheme.weight.symmetric, scheme.act)
        if stage.target_bits is not None:  # measured: a tiny Qwen3-MoE at 4-8 bits reloaded at 2 dB SQNR
            raise UsageError(
                "--target-bits: transformers 5.24 merges a mixture of experts' per-expert linears on load and "
                "de-quantizes them wrongly when their widths are named per linear; use one --scheme"
            )
    # NF4 without data keeps min/max: the weight-error range search clips the blocks' largest weights, which NF4's
    # outer codes exist for (SmolLM2, held-out pages / license texts: +39.8% / +47.3% perplexity against min/max's
    # +29.5% / +46.3%); weighted by the inputs' energy inside GPTQ it helps (+7.2% / +14.6% against +14.9% / +27.5%).
    searched = stage.range_search and not (scheme.weight.kind == "nf4" and not stage.method_class.calibrated)
    target = Target(scheme.weight, scheme.act, keep_zeros, searched, loaded.dtype, device)
    method = stage.method_class(stage.method_options(), target)
    console.print(f"quantize: {scheme.name} ({stage.method}), {len(layers)} layers, group size {scheme.group_note}")
    settings = {
        "scheme": scheme.name,
        "method": stage.method,
        "group_size": scheme.weight.group_size or "channel",
        "group_choice": scheme.group_note,
        "symmetric": scheme.weight.symmetric,
        "range": "searched for least weight MSE" if searched else "min/max",
        "activations": f"dynamic per-token {scheme.act}" if scheme.act else "16-bit",
    }
    text, errors, warnings = None, [], []
    for note in (arch.unreached_note(model), schemes.RUNTIME_NOTES.get(scheme.name)):
        if note:
            warnings.append(note)
            console.print(f"[yellow]warning:[/] {note}")
    batches, allocation = None, None
    settings.update(method.settings())
    if method.calibrated or stage.target_bits is not None:
        batches, text, calibration_warnings = calibration.batches(stage, loaded.tokenizer, console, loaded.model)
        warnings += calibration_warnings
    if stage.target_bits is not None:
        allocation = allocate(stage, loaded, layers, scheme, batches, device, console)
        method.target = replace(target, grids={id(layers[n]): g for n, g in allocation.grids.items()})
        settings.update(mixed_settings(allocation))
    nf4 = scheme.weight.kind == "nf4"
    if nf4:  # written by us in bitsandbytes' format; loaded through bitsandbytes
        check_bitsandbytes()
        sink = lambda weights: bnb_nf4.compress_linears(model, weights, loaded.dtype)  # noqa: E731
    else:
        config = ct_format.config_for(scheme.weight, scheme.act, ignore, allocation.grids if allocation else None)
        sink = lambda weights: ct_format.compress_linears(model, config, weights)  # noqa: E731
    if method.calibrated:
        if outside := outside_blocks(model, layers):
            warnings.append(
                f"{', '.join(outside)}: outside the repeated blocks, where {stage.method} has no calibration inputs; "
                "rounded to nearest on the same grid"
            )
            console.print(f"[yellow]warning:[/] {warnings[-1]}")
    with progress_bar(console, f"{stage.method}: decoder layers") as update, experts.calibrating(model):
        errors = quantize_linears(
            model,
            layers,
            method,
            scheme,
            batches,
            torch.device(device),
            sink=sink,  # each layer once final
            store=loaded.layers,
            progress=update,
        )
    routed = experts.routed_tokens(model, len(batches or []))
    if routed:
        idle = sum(c == 0 for counts in routed.values() for c in counts)
        console.print(
            f"experts: {sum(len(c) for c in routed.values())} in {len(routed)} layers, each calibrated on every token; "
            f"{idle} got no routed token"
        )
    record = StageRecord(
        stage="quantize",
        settings=settings,
        layers=len(layers),
        ignored=ignore,
        seconds=time.perf_counter() - start,
        calibration=text,
        layer_errors=[LayerError(layer=e.layer, rtn=e.rtn, method=e.method) for e in errors],
        warnings=warnings,
        expert_tokens=routed or None,
        linear_bits={n: g.bits for n, g in sorted(allocation.grids.items())} if allocation else None,
    )
    writer = bnb_nf4.Writer(model, set(layers), loaded.dtype) if nf4 else ct_format.finish(model, set(layers))
    return StageResult(record, sorted(layers), compressor=writer)


def check_bitsandbytes() -> None:
    """NF4 checkpoints load through bitsandbytes: the measurements (and the user) need it."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError(
            "--scheme nf4 writes bitsandbytes' format, which loads through bitsandbytes; pip install bitsandbytes"
        ) from None


def allocate(stage, loaded: Loaded, layers, scheme: schemes.Scheme, batches, device: str, console: Console):
    """Mixed precision: each linear's width for the stage's bit budget (quant/mixed.py), said on the console."""
    with progress_bar(console, "mixed precision: cost of each width") as update:
        allocation = mixed.plan(
            loaded.model,
            layers,
            scheme.weight,
            tuple(stage.bit_widths),
            stage.target_bits,
            batches,
            torch.device(device),
            loaded.layers,
            update,
        )
    counts = ", ".join(f"{n} at {b} bits" for b, n in allocation.counts().items())
    console.print(f"mixed precision: {allocation.bits:.2f} bits a weight (asked {stage.target_bits:g}): {counts}")
    return allocation


def mixed_settings(allocation: mixed.Allocation) -> dict:
    return {
        "target_bits": allocation.target,
        "bits_per_weight": round(allocation.bits, 3),
        "linears_per_width": {str(b): n for b, n in allocation.counts().items()},
    }


def quantize_linears(
    model: torch.nn.Module,
    layers: dict[str, torch.nn.Linear],
    method: QuantMethod,
    scheme: schemes.Scheme,
    batches: list[torch.Tensor] | None,
    device: torch.device,
    sink: Callable[[dict[str, QuantizedWeight]], None],
    store: LayerStore | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[calibrate.LayerError]:
    """Quantize `layers` (full names): weight by weight for a method without data, else layer by
    layer on the calibration batches; each finished layer's weights go to `sink`. Per decoder
    layer, the output error of plain RTN and of the method (calibrated methods)."""
    if not method.calibrated:
        _without_data(model, layers, method, sink, store or InMemory())
        return []
    outside = outside_blocks(model, layers)
    errors = calibrate.calibrate_linears(
        model,
        {n: m for n, m in layers.items() if n not in outside},
        batches,
        device,
        gather=lambda layer, targets: method.gather(model, layer, targets),
        prepare=lambda layer: method.prepare(model, layer),
        treat_layer=lambda layer, inputs: quantize_layer(method, model, layer, inputs),
        treat=lambda lins, stats: quantize_together(method, lins, stats),
        threads=method.threads,
        float_stream=method.float_stream,
        baseline=lambda layer, targets, inputs, ref: rtn_error(layer, targets, method.target, inputs, ref),
        sink=sink,
        progress=progress,
        store=store,
    )
    if outside:  # the layer-by-layer pass gives them no inputs: round to nearest on the same grid
        _without_data(model, {n: layers[n] for n in outside}, RTN(RTN.Options(), method.target), sink, InMemory())
    return errors


def outside_blocks(model: torch.nn.Module, layers: dict[str, torch.nn.Linear]) -> list[str]:
    """The linears to quantize that sit outside the repeated blocks (BERT's pooler): calibrated methods see no
    inputs for them, so they are rounded to nearest."""
    prefix = arch.decoder_prefix(model)
    return sorted(n for n in layers if not n.startswith(f"{prefix}."))


def quantize_together(
    method: QuantMethod, lins: list[torch.nn.Linear], stats: calibrate.InputStats | None
) -> list[QuantizedWeight]:
    """Quantize linears that read the same input (q/k/v, gate/up) as one stacked weight: every
    method treats rows independently, so this is exact, and GPTQ factors one Hessian for them
    all. The layer keeps the de-quantized weights (its outputs feed the next layer); the
    integers and scales are kept on the CPU."""
    kept, grids = {}, [method.target.grid_of([lin]) for lin in lins]
    for grid in dict.fromkeys(grids):  # mixed precision: a stack per width
        part = [lin for lin, g in zip(lins, grids) if g == grid]
        w = torch.cat([lin.weight for lin in part]) if len(part) > 1 else part[0].weight  # [sum O, I]
        q, scale, zp = method.on_grid(grid).quantize(w, stats)
        check_scales(scale, part)
        row = 0
        for lin in part:
            rows = slice(row, row + lin.out_features)
            row += lin.out_features
            kept[id(lin)] = _keep(lin, q[rows], scale[rows], zp[rows])
        heap.trim()  # the temporaries' pages go back before the next group's are taken
    return [kept[id(lin)] for lin in lins]


def quantize_layer(
    method: QuantMethod, model: torch.nn.Module, layer: calibrate.Layer, inputs: LayerInputs
) -> dict[str, QuantizedWeight] | None:
    """A method that treats the decoder layer as a whole (None: it quantizes groups of linears)."""
    results = method.quantize_layer(model, layer, inputs)
    if results is None:
        return None
    out = {}
    for name, (q, scale, zp) in results.items():
        check_scales(scale, [layer.targets[name]], name)
        out[name] = _keep(layer.targets[name], q, scale, zp)
    return out


def _keep(lin: torch.nn.Linear, q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> QuantizedWeight:
    """The linear keeps its de-quantized weight (its outputs feed the next layer); the integers and
    scales go to the CPU."""
    lin.weight.data = dequantize(q, scale, zp).to(lin.weight.dtype)
    return QuantizedWeight(q.cpu(), scale.cpu(), zp.cpu())


def check_scales(scale: torch.Tensor, lins: list[torch.nn.Linear], name: str | None = None) -> None:
    """Scales must be finite and non-zero (symmetric int scales may be negative: see qparams), or the checkpoint
    de-quantizes to garbage."""
    s = scale.float()
    if not bool(torch.isfinite(s).all()) or not bool((s != 0).all()):
        what = name or f"{len(lins)} linear(s) of shape {tuple(lins[0].weight.shape)}"
        raise CompressError(f"{what}: the method produced non-finite or zero scales; nothing was written")


def rtn_error(
    layer: torch.nn.Module,
    targets: dict[str, torch.nn.Linear],
    target: Target,
    inputs: LayerInputs,
    ref: list[torch.Tensor],
) -> float:
    """Output error of this layer with plain min/max RTN (the baseline every method improves on)."""
    saved = {n: m.weight.data.clone() for n, m in targets.items()}
    for m in targets.values():
        m.weight.data = fake_quantize(m.weight.float(), target.grid_of([m])).to(m.weight.dtype)
    err = calibrate.relative_error(ref, calibrate.run_layer(layer, inputs))
    for n, m in targets.items():
        m.weight.data = saved[n]
    return err


@torch.no_grad()  # weights are Parameters: without it every step would build an autograd graph (5x the memory)
def _without_data(model, layers: dict[str, torch.nn.Linear], method: QuantMethod, sink, store: LayerStore) -> None:
    """A method without data, one decoder layer at a time (loaded and released through `store`),
    then the quantized linears outside the decoder layers, if any."""

    def quantize(names: list[str]) -> None:
        for name in names:
            lin = model.get_submodule(name)
            q, scale, zp = method.on_grid(method.target.grid_of([lin])).quantize(lin.weight, None)
            check_scales(scale, [lin], name)
            sink({name: QuantizedWeight(q, scale, zp)})
            heap.trim()

    inside = set()
    for i, block in enumerate(store.layers if isinstance(store, OnDisk) else []):
        names = [n for n in layers if n.startswith(f"{store.prefix}.{i}.")]
        store.load(i, block)
        quantize(names)
        store.release(i, block)
        inside.update(names)
    quantize([n for n in layers if n not in inside])
