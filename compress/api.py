"""The one runner every command goes through: `run(recipe)`.

check -> plan -> load -> stages in order -> write atomically (checkpoint, recipe.yaml) ->
measure base and result in fresh processes -> gate -> report.json / report.md.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import compressed_tensors
import psutil
import torch
import transformers
from rich.console import Console

import compress
from compress import plan, stages
from compress.data import generated, text as textdata
from compress.distill import stage as distill_stage
from compress.errors import UsageError
from compress.eval import size, tasks
from compress.eval.latency import cpu_name
from compress.eval.measure import measure
from compress.eval.memory import PeakRSS, peak_rss
from compress.eval.perplexity import token_windows
from compress.formats import bnb_nf4, compressed_tensors as ct_format, sparse
from compress.formats.atomic import atomic_dir, check_output, resumable, staging_dir
from compress.models import load as loading, source as sources
from compress.models.arch import max_positions
from compress.models.compute import saved_as
from compress.models.offload import OnDisk
from compress.prune import stage as prune_stage
from compress.quant import stage as quant_stage
from compress.recipe import DistillStage, PruneStage, QuantizeStage, Recipe
from compress.report import gates, html_report
from compress.report.schema import Measurement, Report


def environment() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed-tensors": compressed_tensors.__version__,
        "cpu": cpu_name(),
        "threads": str(torch.get_num_threads()),
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_main_process() -> bool:
    """False in the other processes of a `torchrun` / `accelerate launch` job: they train, the
    main one writes."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Inputs:
    """What a checked recipe reads: the model, the teachers of its distill stages, the evaluation text."""

    src: sources.Source
    teachers: list[sources.Source]
    texts: textdata.Texts | None
    staged: bool  # resumable: built in a fixed staging directory


@dataclass
class Written:
    """What the measurements need once the model has been written and released."""

    task: str
    layers: list[str]  # the compressed linears
    base: Path  # the original checkpoint, also when resuming
    records: list  # each stage's StageRecord
    compute: str  # the dtype the stages computed in, and why when it is not the stored one


def run(
    recipe: Recipe,
    console: Console | None = None,
    resume: bool = False,
    dry_run: bool = False,
    checked: Callable[[], None] | None = None,
) -> Report | plan.Plan | None:
    """Run the recipe and return its report (None in the non-main processes of a distributed
    job). resume: go on after the last finished stage of an interrupted run (and inside a
    distill stage, from its last checkpoint). dry_run: check everything, return the plan.
    checked: called once every check has passed, before anything heavy runs."""
    console = console or Console(stderr=True)  # the CLI passes one that neutralises control characters
    inputs = check(recipe, resume, console)
    the_plan = plan.make(recipe, inputs.src, inputs.teachers, Path(recipe.output))
    _check_gates_fit(recipe, the_plan.base.task)
    tasks.check(recipe.evaluate.tasks if recipe.evaluate.enabled else [], the_plan.base.task)
    _check_lengths(recipe, the_plan.base)
    recipe = _fit_positions(recipe, the_plan.base.positions, console)
    if dry_run:
        return the_plan
    plan.check(the_plan)
    if checked:
        checked()
    main = is_main_process()
    dest = Path(recipe.output)
    with (
        atomic_dir(dest, recipe.overwrite, stable=inputs.staged, resume=resume, needed=the_plan.disk_bytes)
        if main
        else _shared(staging_dir(dest)) as tmp
    ):
        if main:
            _same_recipe(tmp, recipe, resume)
            _same_inputs(tmp, fingerprints(recipe, inputs), resume)
        written = run_stages(recipe, inputs, tmp, resume, main, console)
        if written is None:
            return None
        report = measure_and_report(recipe, inputs, written, the_plan, tmp, dest, console)
        html_report.write(report, tmp)
    return report


def check(recipe: Recipe, resume: bool, console: Console) -> Inputs:
    """Everything that can be refused before anything heavy runs."""
    if not recipe.output:
        raise UsageError("no output directory: pass -o OUT or set `output:` in the recipe")
    dest = Path(recipe.output)
    src = sources.resolve(recipe.model, recipe.allow_pickle)
    teachers = [
        sources.resolve(s.teacher, recipe.allow_pickle) if s.teacher else src
        for s in recipe.stages
        if isinstance(s, DistillStage)
    ]
    check_output(dest, recipe.overwrite, read_by(recipe, src, teachers))
    _check_stages(recipe)
    staged = bool(teachers) or len(recipe.stages) > 1
    if resume and not staged:
        raise UsageError("--resume continues a recipe of several stages or with a distill stage; this one has neither")
    if resume and not resumable(staging_dir(dest)):
        console.print(f"nothing to resume in {staging_dir(dest)}: starting from the beginning")
    for stage in recipe.stages:  # every text exists and is readable (generated text is sampled when it is used)
        if stage.reads_text and stage.dataset != generated.NAME:
            textdata.load(stage.dataset, "calibration", stage.text_column)
    spec = recipe.evaluate
    texts = textdata.evaluation(spec.dataset, spec.also, spec.text_column) if spec.enabled else None
    return Inputs(src, teachers, texts, staged)


def read_by(recipe: Recipe, src: sources.Source, teachers: list[sources.Source]) -> list[Path]:
    """The model, the teachers and the local text files the recipe reads."""
    texts = [s.dataset for s in recipe.stages if s.reads_text] + [recipe.evaluate.dataset]
    names = [n for d in texts for n in textdata.parts(d)]
    local = [Path(n).expanduser() for n in names if n != "builtin" and Path(n).expanduser().exists()]
    return [src.path, *(t.path for t in teachers), *local]


def fingerprints(recipe: Recipe, inputs: Inputs) -> dict[str, str]:
    """What a resumed run must find unchanged: the model, the teachers and the local texts."""
    return {str(p): sources.fingerprint(p) for p in read_by(recipe, inputs.src, inputs.teachers) if p.exists()}


def run_stages(recipe: Recipe, inputs: Inputs, tmp: Path, resume: bool, main: bool, console: Console) -> Written | None:
    """Load the model (or the last kept stage), run the stages, write the checkpoint into `tmp`.
    None in the non-main processes of a distributed job."""
    kept = stages.last(tmp) if resume else None
    done = kept[1] if kept else stages.Done()
    start_src = sources.Source(f"{recipe.model} after stage {done.count - 1}", "dir", kept[0]) if kept else inputs.src
    if kept:
        console.print(f"resuming after stage {done.count - 1} ({done.records[-1].stage}), kept in {kept[0]}")
    console.print(f"loading {start_src.spec}{' (decoder layers stay on disk)' if recipe.offload else ''} ...")
    rss_start = psutil.Process().memory_info().rss
    only_distill = all(isinstance(s, DistillStage) for s in recipe.stages)
    loaded = loading.load(
        start_src,
        recipe.dtype,
        recipe.device,
        recipe.trust_remote_code,
        recipe.allow_pickle,
        recipe.offload,
        quantized=only_distill,
    )
    computed = _dtype_name(next(loaded.model.parameters()).dtype)
    compute = computed
    if computed != _dtype_name(loaded.dtype):
        compute = f"{computed}, stored as {_dtype_name(loaded.dtype)} (16-bit matmuls are slow on this CPU)"
        console.print(f"computing in {compute}")
    if isinstance(loaded.layers, OnDisk):
        loaded.layers.out_dir = tmp  # each quantized layer is written there at once
    compressor = None
    if done.sparsity is None:
        done.sparsity = sparse.info(loaded.checkpoint)  # a pruned input keeps its zeros
    spec, heldout = recipe.evaluate, None
    if inputs.teachers and inputs.texts is not None and loaded.task == "causal-lm":
        positions = max_positions(loaded.model.config)
        heldout = token_windows(loaded.tokenizer, inputs.texts.texts, spec.seq_len, spec.max_tokens, positions)
    teacher_of = iter(inputs.teachers[sum(isinstance(s, DistillStage) for s in recipe.stages[: done.count]) :])
    for i, stage in enumerate(recipe.stages[done.count :], done.count):
        with PeakRSS() as peak:
            if isinstance(stage, QuantizeStage):
                result = quant_stage.run(stage, loaded, recipe.device, console, keep_zeros=done.sparsity is not None)
            elif isinstance(stage, PruneStage):
                result = prune_stage.run(stage, loaded, recipe.device, console)
            else:
                result = distill_stage.run(
                    stage,
                    loaded,
                    next(teacher_of),
                    recipe.dtype,
                    recipe.device,
                    heldout,
                    tmp,
                    resume and i == done.count,
                    masked=done.sparsity is not None,
                    console=console,
                    trust_remote_code=recipe.trust_remote_code,
                )
        compressor = result.compressor or compressor
        if result.compressor or isinstance(stage, PruneStage):
            done.layers = result.changed if result.compressor else done.layers or result.changed
        if isinstance(stage, PruneStage):
            done.sparsity = result.sparsity or done.sparsity
            done.sparse_storage = result.sparse_storage
        done.records.append(result.record.model_copy(update={"peak_memory_bytes": peak.bytes - rss_start}))
        if main and i < len(recipe.stages) - 1 and not loaded.quantized:
            stages.save(tmp, i, stage.stage, loaded, done)
        if main:
            shutil.rmtree(tmp / "checkpoints", ignore_errors=True)  # a finished stage's training state
    if not main:
        return None

    console.print(f"writing {recipe.output} ...")
    shutil.rmtree(tmp / "stages", ignore_errors=True)  # kept for --resume only
    (tmp / ".inputs.json").unlink(missing_ok=True)
    with saved_as(loaded.model, loaded.dtype):
        loaded.layers.save(loaded.model, tmp)  # the weights, config.json, generation config
    if isinstance(compressor, bnb_nf4.Writer):
        compressor.write_config(tmp)
    elif compressor is not None:
        ct_format.write_config(compressor, tmp, loaded.model)  # + quantization_config
    if done.sparsity is not None:
        sparse.record(
            tmp, sparse.carried(done.sparsity) | ({"storage": "dense", "format": "dense"} if compressor else {})
        )
        if done.sparse_storage:
            sparse.compress_checkpoint(tmp, done.sparse_storage)
    loaded.tokenizer.save_pretrained(tmp)
    loading.copy_sidecars(loaded.checkpoint, tmp)  # recipe.yaml was written at the start (`_same_recipe`)
    task = loaded.task
    del loaded  # the measurements reload from disk, in their own processes
    return Written(task, done.layers, loading.checkpoint_dir(inputs.src, recipe.dtype), done.records, compute)


def measure_and_report(
    recipe: Recipe, inputs: Inputs, written: Written, the_plan: plan.Plan, tmp: Path, dest: Path, console: Console
) -> Report:
    """Measure base and result (each reloaded in a fresh process), check the gates."""
    run_peak = peak_rss()
    spec, base, speed = recipe.evaluate, None, None
    if spec.enabled:
        with tempfile.TemporaryDirectory(prefix="compress-emb-") as emb:
            base_emb = Path(emb) / "base.pt"
            one = functools.partial(
                measure, task=written.task, texts=inputs.texts, layers=written.layers, device=recipe.device,
                trust_remote_code=recipe.trust_remote_code,
            )  # fmt: skip
            console.print("measuring the base model ...")
            untimed = spec.model_copy(update={"latency": False})  # timed below, beside the result
            base = one(written.base, spec=untimed, keep_embeddings=base_emb, reuse=spec.reuse_base).measurement
            console.print("measuring the result, reloaded by plain transformers ...")
            got = one(
                tmp,
                spec=spec,
                base_embeddings=base_emb,
                timed_with=written.base if spec.latency else None,
                compared_with=written.base if spec.kl_divergence else None,
            )
            result, speed = got.measurement, got.speed
            base.latency = got.base_latency
    else:
        result = _size_only(tmp, written.layers)
    result.path = str(dest)
    report = Report(
        tool=f"compress {compress.__version__}",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model=recipe.model,
        task=written.task,
        recipe=recipe.model_dump(mode="json"),
        stages=written.records,
        base=base,
        result=result,
        environment=environment() | {"compute dtype": written.compute},
        notes=_notes(inputs.src, recipe),
        run_peak_rss_bytes=run_peak,
        speed=speed,
        estimate={
            "peak_rss_bytes": the_plan.peak_bytes,
            "bytes_on_disk": the_plan.output_bytes,
            "seconds": round(sum(s.seconds for s in the_plan.stages), 1),
        },
    )
    if recipe.gates.any():
        results = gates.check(recipe.gates, report)
        report = report.model_copy(update={"gates": results, "passed": all(g.passed for g in results)})
    return report


def _same_recipe(tmp: Path, recipe: Recipe, resume: bool) -> None:
    """A resumed run must be the run that was interrupted."""
    mark = tmp / "recipe.yaml"
    if resume and mark.is_file() and mark.read_text() != recipe.to_yaml():
        raise UsageError(
            f"the recipe differs from the interrupted run's ({mark}); resume with the same recipe and options, or "
            f"--overwrite"
        )
    mark.write_text(recipe.to_yaml())


def _same_inputs(tmp: Path, now: dict[str, str], resume: bool) -> None:
    """A resumed run must read what the interrupted one read."""
    mark = tmp / ".inputs.json"
    if resume and mark.is_file():
        before = json.loads(mark.read_text())
        changed = sorted(p for p in set(before) | set(now) if before.get(p) != now.get(p))
        if changed:
            raise UsageError(
                f"{changed[0]} changed since the interrupted run (names, sizes or times of its files); "
                "rerun without --resume (with --overwrite) to start over"
            )
    mark.write_text(json.dumps(now))


def _check_lengths(recipe: Recipe, base: plan.Facts) -> None:
    """The latency prompt and its new tokens must fit the model's positions (else the measurement
    would fail after all the work)."""
    spec, limit = recipe.evaluate, base.positions
    if (
        spec.enabled
        and spec.latency
        and base.task == "causal-lm"
        and limit
        and spec.prompt_len + spec.new_tokens > limit
    ):
        raise UsageError(
            f"evaluate.prompt_len {spec.prompt_len} + evaluate.new_tokens {spec.new_tokens} = "
            f"{spec.prompt_len + spec.new_tokens} positions; the model takes at most {limit}"
        )


def _fit_positions(recipe: Recipe, limit: int | None, console: Console) -> Recipe:
    """Calibration and training windows no longer than the model's positions (OPT-350m has 2048, some small
    models 256; a longer window indexes past the position embeddings), each shortening said. The evaluation
    windows are fitted where they are measured (eval/worker.py), which notes it in the report."""
    if not limit or all(s.seq_len <= limit for s in recipe.stages):
        return recipe
    stages = []
    for i, s in enumerate(recipe.stages):
        if s.seq_len > limit:
            console.print(
                f"note: stage {i} ({s.stage}): windows of {s.seq_len} tokens shortened to the model's {limit}"
            )
            s = s.model_copy(update={"seq_len": limit})
        stages.append(s)
    return recipe.model_copy(update={"stages": stages})


def _check_gates_fit(recipe: Recipe, task: str) -> None:
    g = recipe.gates
    if task == "encoder" and g.max_ppl_increase is not None:
        raise UsageError("gates.max_ppl_increase: an encoder has no perplexity; use min_embedding_similarity")
    if task == "encoder" and g.max_kl_divergence is not None:
        raise UsageError(
            "gates.max_kl_divergence: an encoder has no next-token distribution; use min_embedding_similarity"
        )
    if g.max_kl_divergence is not None and not recipe.evaluate.kl_divergence:
        raise UsageError("gates.max_kl_divergence needs evaluate.kl_divergence (turned off by --no-kl-divergence)")
    if task == "causal-lm" and g.min_embedding_similarity is not None:
        raise UsageError(
            "gates.min_embedding_similarity is for encoders; use max_ppl_increase for a causal language model"
        )


class _shared:
    """The staging directory as the non-main processes of a distributed job see it: the main
    process creates and finishes it."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> bool:
        return False


def _check_stages(recipe: Recipe) -> None:
    """What the stages can do together, before anything is loaded."""
    kinds = [s.stage for s in recipe.stages]
    if kinds.count("quantize") > 1:
        raise UsageError("a recipe may quantize once; merge the quantize stages")
    if "quantize" in kinds and "prune" in kinds[kinds.index("quantize") :]:
        raise UsageError("prune before quantize: a quantized checkpoint cannot be pruned again")
    if "quantize" in kinds and any(isinstance(s, PruneStage) and s.storage == "sparse" for s in recipe.stages):
        raise UsageError(
            "storage: sparse cannot be combined with quantization (no compressed-tensors release stores both); "
            "keep storage: dense, the zeros stay zeros through quantization"
        )
    if "quantize" in kinds and "distill" in kinds[kinds.index("quantize") :]:
        raise UsageError(
            "distill before quantize in one recipe; to heal a quantized model, distill its checkpoint: "
            "compress distill --student QUANTIZED"
        )
    if recipe.offload and ("prune" in kinds or "distill" in kinds):
        raise UsageError("--offload works for quantize stages only; prune and distill load the model in memory")


def _size_only(path: Path, layers: list[str]) -> Measurement:
    return Measurement(
        path=str(path), bytes_on_disk=size.bytes_on_disk(path), bits_per_weight=size.bits_per_weight(path, layers)
    )


def _notes(src: sources.Source, recipe: Recipe) -> list[str]:
    notes = []
    for stage in recipe.stages:
        if stage.reads_text and stage.dataset != "builtin" and stage.dataset == recipe.evaluate.dataset:
            use = "training" if isinstance(stage, DistillStage) else "calibration"
            notes.append(f"{use} and evaluation both read {stage.dataset}: the perplexity is not on held-out text")
    if src.is_gguf:
        notes.append(
            f"base: {src.path.name} de-quantized by transformers and saved as a Hugging Face checkpoint; "
            "its weights were already rounded by the GGUF quantization it ships with"
        )
    for stage in recipe.stages:
        if isinstance(stage, PruneStage) and stage.method != "structured":
            kernel = (
                " (2:4 is faster only on semi-structured sparse GPU kernels, which the latency uses with --device cuda)"
                if stage.pattern == "2:4"
                else ""
            )
            stored = (
                "bitmask + values: smaller on disk, read back by compress, not by plain transformers"
                if stage.storage == "sparse"
                else "dense with zeros: loads in plain transformers, same size on disk"
            )
            notes.append(
                f"{stage.pattern} sparsity leaves dense kernels the same work: expect no speed-up from it{kernel}; "
                f"storage {stored}"
            )
    nf4 = any(isinstance(st, QuantizeStage) and st.scheme == "nf4" for st in recipe.stages)
    if nf4:
        notes.append(
            "nf4: bitsandbytes keeps the weights packed in memory (4 bits and a float32 absmax a block) and "
            "de-quantizes them in every forward pass: smaller in memory, not faster than dense on CPU"
        )
    elif any(isinstance(st, QuantizeStage) for st in recipe.stages):
        notes.append(
            "on CPU, transformers decompresses compressed-tensors weights to dense on the first forward: speed and "
            "in-memory size match the base; the gain here is on disk. Low-bit kernels run in vLLM on GPU."
        )
    return notes
