"""The quantize stage: scheme resolved, RTN or a calibrated method run layer by layer, each
layer compressed into the compressed-tensors format as soon as it is final."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.progress import Progress, TimeElapsedColumn

from compress import heap
from compress.data import text as textdata, tokens
from compress.errors import UsageError
from compress.formats import compressed_tensors as ct_format
from compress.models import arch, load as loading
from compress.models.offload import OnDisk
from compress.quant import calibrated, rtn, schemes
from compress.recipe import PruneStage, QuantizeStage
from compress.report.schema import StageRecord

CALIBRATION_BATCH = 4  # calibration windows per forward pass


def calibration_batches(stage: QuantizeStage | PruneStage, tokenizer, console: Console) -> tuple[list[torch.Tensor], str, list[str]]:
    texts = textdata.load(stage.dataset, "calibration", stage.text_column)
    wins = tokens.windows(tokenizer, texts.texts, stage.seq_len, stage.samples * stage.seq_len)
    warnings = []
    if len(wins) == 0:
        raise UsageError(f"calibration text ({texts.description}) is shorter than one sample of {stage.seq_len} tokens; lower --seq-len")
    if len(wins) < stage.samples:
        warnings.append(f"calibration text holds {len(wins)} samples of {stage.seq_len} tokens, fewer than the {stage.samples} asked; using {len(wins)}")
        console.print(f"[yellow]warning:[/] {warnings[-1]}")
    desc = f"{texts.description}; {len(wins)} samples x {stage.seq_len} tokens"
    return list(wins.split(CALIBRATION_BATCH)), desc, warnings


def run(stage: QuantizeStage, loaded: loading.Loaded, device: str, console: Console, keep_zeros: bool) -> tuple[StageRecord, object]:
    model = loaded.model
    start = time.perf_counter()
    layers, ignore = arch.quant_targets(model, stage.ignore)
    scheme = schemes.resolve(stage, {n: m.in_features for n, m in layers.items()})
    console.print(f"quantize: {scheme.name} ({stage.method}), {len(layers)} layers, group size {scheme.group_note}")
    settings = {
        "scheme": scheme.name, "method": stage.method, "group_size": scheme.weight.group_size or "channel",
        "group_choice": scheme.group_note, "symmetric": scheme.weight.symmetric,
        "range": "searched for least weight MSE" if stage.range_search else "min/max",
        "activations": f"dynamic per-token {scheme.act}" if scheme.act else "16-bit",
    }
    calibration, layer_errors, warnings = None, [], []
    config = ct_format.config_for(scheme, ignore)
    if stage.method == "rtn":
        _rtn(model, layers, scheme, stage.range_search, config, loaded.layers)
    else:
        batches, calibration, warnings = calibration_batches(stage, loaded.tokenizer, console)
        opts = calibrated.Options(stage.method, stage.range_search, stage.dampening, stage.block_size, stage.actorder, stage.awq_grid,
                                  alpha=stage.alpha, act=scheme.act, keep_zeros=keep_zeros)
        settings.update({k: "searched" if v is None else v for k, v in stage.model_dump().items() if k in _METHOD_KEYS[stage.method]})
        with Progress(*Progress.get_default_columns(), TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(f"{stage.method}: decoder layers", total=None)
            _, layer_errors = calibrated.apply(
                model, layers, scheme.weight, batches, opts, torch.device(device),
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                sink=lambda weights: ct_format.compress_linears(model, config, weights),  # each layer compressed once final
                store=loaded.layers,
            )
    compressor = ct_format.finish(model, set(layers))
    record = StageRecord(
        stage="quantize", settings=settings, layers=len(layers), ignored=ignore, seconds=time.perf_counter() - start,
        calibration=calibration, layer_errors=layer_errors, warnings=warnings,
    )
    return record, (compressor, sorted(layers))


def _rtn(model, layers: dict[str, torch.nn.Linear], scheme: schemes.Scheme, range_search: bool, config, store) -> None:
    """Round to nearest, one decoder layer at a time (loaded and released through `store`),
    then the quantized linears outside the decoder layers, if any."""

    def quantize(names: list[str]) -> None:
        for name in names:
            lin = model.get_submodule(name)
            qw = rtn.quantize_weight(lin.weight, scheme.weight, lin.weight.dtype, range_search)
            ct_format.compress_linears(model, config, {name: qw})
            heap.trim()

    inside = set()
    for i, block in enumerate(store.layers if isinstance(store, OnDisk) else []):
        names = [n for n in layers if n.startswith(f"{store.prefix}.{i}.")]
        store.load(i, block)
        quantize(names)
        store.release(i, block)
        inside.update(names)
    quantize([n for n in layers if n not in inside])


_METHOD_KEYS = {
    "gptq": ("dampening", "block_size", "actorder"),
    "awq": ("awq_grid",),
    "smoothquant+gptq": ("alpha", "dampening", "block_size", "actorder"),
    "smoothquant+rtn": ("alpha",),
}
