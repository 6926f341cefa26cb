"""The one runner every command goes through: `run(recipe)`.

load -> stages in order -> write atomically (checkpoint, recipe.yaml) -> measure base
and result in fresh processes -> report.json / report.md.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.progress import Progress, TimeElapsedColumn

import compress
from compress import heap
from compress.data import text as textdata, tokens
from compress.errors import UsageError
from compress.eval import size
from compress.eval.measure import measure
from compress.eval.memory import PeakRSS
from compress.formats import compressed_tensors as ct_format
from compress.distill import stage as distill_stage
from compress.eval.perplexity import token_windows
from compress.formats.atomic import atomic_dir, check_output, staging_dir
from compress.models import arch, load as loading, source as sources
from compress.models.offload import OnDisk
from compress.quant import calibrated, rtn, schemes
from compress.formats import sparse
from compress.prune import stage as prune_stage
from compress.quant.rtn import QuantizedWeight
from compress.recipe import DistillStage, PruneStage, QuantizeStage, Recipe
from compress.report import render
from compress.report.schema import Measurement, Report, StageRecord

CALIBRATION_BATCH = 4  # calibration windows per forward pass


def _calibration_batches(stage: QuantizeStage | PruneStage, tokenizer, console: Console) -> tuple[list[torch.Tensor], str, list[str]]:
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


def _quantize(stage: QuantizeStage, loaded: loading.Loaded, device: str, console: Console, keep_zeros: bool) -> tuple[StageRecord, object]:
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
        batches, calibration, warnings = _calibration_batches(stage, loaded.tokenizer, console)
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


def environment() -> dict[str, str]:
    import compressed_tensors
    import transformers

    from compress.eval.latency import cpu_name

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "compressed-tensors": compressed_tensors.__version__, "cpu": cpu_name(), "threads": str(torch.get_num_threads()),
    }


def is_main_process() -> bool:
    """False in the other processes of a `torchrun` / `accelerate launch` job: they train, the
    main one writes."""
    return int(os.environ.get("RANK", "0")) == 0


def run(recipe: Recipe, console: Console | None = None, resume: bool = False) -> Report | None:
    """Run the recipe; the report (None in the non-main processes of a distributed job).
    resume: continue an interrupted distill stage from its last checkpoint."""
    console = console or Console(stderr=True)
    if not recipe.output:
        raise UsageError("no output directory: pass -o OUT or set `output:` in the recipe")
    dest = Path(recipe.output)
    src = sources.resolve(recipe.model, recipe.allow_pickle)
    teachers = [sources.resolve(s.teacher, recipe.allow_pickle) if s.teacher else src for s in recipe.stages if isinstance(s, DistillStage)]
    check_output(dest, recipe.overwrite, [src.path, *(t.path for t in teachers)])
    _check_stages(recipe)
    trains = bool(teachers)
    if resume and not trains:
        raise UsageError("--resume continues a distill stage; this recipe has none")
    main = is_main_process()
    spec = recipe.evaluate
    texts = textdata.load(spec.dataset, "evaluation", spec.text_column) if spec.enabled else None

    with atomic_dir(dest, recipe.overwrite, stable=trains, resume=resume) if main else _shared(staging_dir(dest)) as tmp:
        console.print(f"loading {recipe.model}{' (decoder layers stay on disk)' if recipe.offload else ''} ...")
        rss_start = psutil.Process().memory_info().rss
        only_distill = all(isinstance(s, DistillStage) for s in recipe.stages)
        loaded = loading.load(src, recipe.dtype, recipe.device, recipe.trust_remote_code, recipe.allow_pickle, recipe.offload,
                              quantized=only_distill)
        if isinstance(loaded.layers, OnDisk):
            loaded.layers.out_dir = tmp  # each quantized layer is written there at once
        records, compressor, layers, pruned = [], None, [], None
        sparsity = sparse.info(loaded.checkpoint)  # a pruned input keeps its zeros
        heldout, teacher_of = None, iter(teachers)
        if trains and texts is not None and loaded.task == "causal-lm":
            heldout = token_windows(loaded.tokenizer, texts.texts, spec.seq_len, spec.max_tokens)
        for stage in recipe.stages:
            with PeakRSS() as peak:
                if isinstance(stage, QuantizeStage):
                    record, (compressor, layers) = _quantize(stage, loaded, recipe.device, console, keep_zeros=sparsity is not None)
                elif isinstance(stage, PruneStage):
                    record, pruned = prune_stage.run(stage, loaded, recipe.device, console,
                                                     lambda st: _calibration_batches(st, loaded.tokenizer, console))
                    sparsity = pruned.sparsity or sparsity
                    layers = layers or pruned.linears
                else:
                    record, distilled = distill_stage.run(stage, loaded, next(teacher_of), recipe.dtype, recipe.device, heldout, tmp, resume,
                                                          masked=sparsity is not None, console=console,
                                                          trust_remote_code=recipe.trust_remote_code)
                    if distilled.quantized:  # a quantized student is saved quantized again, on its own grid
                        compressor, layers = _requantize(loaded, distilled.quantized)
            records.append(record.model_copy(update={"peak_memory_bytes": peak.bytes - rss_start}))
        if not main:
            return None

        console.print(f"writing {dest} ...")
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)  # training state: not part of the result
        loaded.layers.save(loaded.model, tmp)  # the weights, config.json, generation config
        if compressor is not None:
            compressor.update_config(str(tmp))  # + quantization_config
        if sparsity is not None:
            sparse.record(tmp, {k: v for k, v in sparsity.items() if k != "densified_from"} | ({"storage": "dense", "format": "dense"} if compressor else {}))
            if pruned and pruned.sparsity and pruned.sparsity["storage"] == "sparse":
                sparse.compress_checkpoint(tmp, pruned.linears)
        loaded.tokenizer.save_pretrained(tmp)
        loading.copy_sidecars(loaded.checkpoint, tmp)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        task, base_ckpt = loaded.task, loaded.checkpoint
        del loaded  # the measurements reload from disk, in their own processes

        base = result = None
        if spec.enabled:
            with tempfile.TemporaryDirectory(prefix="compress-emb-") as emb:
                base_emb = Path(emb) / "base.pt"
                console.print("measuring the base model ...")
                base = measure(base_ckpt, task, spec, texts, layers, recipe.device, recipe.trust_remote_code, keep_embeddings=base_emb)
                console.print("measuring the result, reloaded by plain transformers ...")
                result = measure(tmp, task, spec, texts, layers, recipe.device, recipe.trust_remote_code, base_embeddings=base_emb)
        else:
            result = _size_only(tmp, layers)
        result.path = str(dest)
        report = Report(
            tool=f"compress {compress.__version__}",
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            model=recipe.model, task=task, recipe=recipe.model_dump(mode="json"), stages=records,
            base=base, result=result, environment=environment(), notes=_notes(src, recipe),
        )
        render.write(report, tmp)
    return report


class _shared:
    """The staging directory as the non-main processes of a distributed job see it: the main
    process creates and finishes it."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> bool:
        return False


def _requantize(loaded: loading.Loaded, quantized: dict) -> tuple[object, list[str]]:
    config, _ = loaded.quantized
    ct_format.compress_linears(loaded.model, config, {n: QuantizedWeight(q, p.scale, p.zero_point) for n, (q, p) in quantized.items()})
    return ct_format.finish(loaded.model, set(quantized)), sorted(quantized)


def _check_stages(recipe: Recipe) -> None:
    """What the stages can do together, before anything is loaded."""
    kinds = [s.stage for s in recipe.stages]
    if kinds.count("quantize") > 1:
        raise UsageError("a recipe may quantize once; merge the quantize stages")
    if "quantize" in kinds and "prune" in kinds[kinds.index("quantize"):]:
        raise UsageError("prune before quantize: a quantized checkpoint cannot be pruned again")
    if "quantize" in kinds and any(isinstance(s, PruneStage) and s.storage == "sparse" for s in recipe.stages):
        raise UsageError("storage: sparse cannot be combined with quantization (no compressed-tensors release stores both); "
                         "keep storage: dense, the zeros stay zeros through quantization")
    if "quantize" in kinds and "distill" in kinds[kinds.index("quantize"):]:
        raise UsageError("distill before quantize in one recipe; to heal a quantized model, distill its checkpoint: "
                         "compress distill --student QUANTIZED")
    if recipe.offload and ("prune" in kinds or "distill" in kinds):
        raise UsageError("--offload works for quantize stages only; prune and distill load the model in memory")


def _size_only(path: Path, layers: list[str]) -> Measurement:
    return Measurement(path=str(path), bytes_on_disk=size.bytes_on_disk(path), bits_per_weight=size.bits_per_weight(path, layers))


def _notes(src: sources.Source, recipe: Recipe) -> list[str]:
    notes = []
    for stage in recipe.stages:
        reads_text = isinstance(stage, DistillStage) or stage.method not in ("rtn", "magnitude")
        if reads_text and stage.dataset != "builtin" and stage.dataset == recipe.evaluate.dataset:
            use = "training" if isinstance(stage, DistillStage) else "calibration"
            notes.append(f"{use} and evaluation both read {stage.dataset}: the perplexity is not on held-out text")
    if src.is_gguf:
        notes.append(
            f"base: {src.path.name} de-quantized by transformers and saved as a Hugging Face checkpoint; "
            "its weights were already rounded by the GGUF quantization it ships with"
        )
    for stage in recipe.stages:
        if isinstance(stage, PruneStage) and stage.method != "structured":
            kernel = " (2:4 is faster only on semi-structured sparse GPU kernels, not used here)" if stage.pattern == "2:4" else ""
            stored = ("bitmask + values: smaller on disk, read back by compress, not by plain transformers" if stage.storage == "sparse"
                      else "dense with zeros: loads in plain transformers, same size on disk")
            notes.append(f"{stage.pattern} sparsity leaves dense kernels the same work: expect no speed-up from it{kernel}; storage {stored}")
    if any(isinstance(st, QuantizeStage) for st in recipe.stages):
        notes.append(
            "on CPU, transformers decompresses compressed-tensors weights to dense on the first forward: speed and "
            "in-memory size match the base; the gain here is on disk. Low-bit kernels run in vLLM on GPU."
        )
    return notes
