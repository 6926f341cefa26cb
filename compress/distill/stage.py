"""The distill stage: teacher and student checked, trained, measured, handed back to the runner."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from compress.data import generated, text as textdata
from compress.distill import constraints, data as traindata, trainer
from compress.distill.losses import layer_map
from compress.errors import UsageError
from compress.eval.perplexity import perplexity
from compress.formats import compressed_tensors as ct_format
from compress.models import arch, load as loading
from compress.models.source import Source
from compress.primitives.qparams import QuantizedWeight
from compress.recipe import DistillStage
from compress.report.schema import StageRecord, Training
from compress.stages import StageResult


def accelerator_for(stage: DistillStage, device: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    bf16 = stage.bf16(device)
    # accelerate keeps one mixed-precision setting per process: a second distill stage (or a second
    # api.run in one Python process) with another autocast would be refused. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=device == "cpu", mixed_precision="bf16" if bf16 else "no")


def check_pair(teacher: loading.Loaded, student: loading.Loaded) -> None:
    """Same tokenizer and vocabulary, or the logits cannot be compared: refuse before training."""
    if teacher.task != "causal-lm" or student.task != "causal-lm":
        raise UsageError("distillation needs two causal language models (teacher and student)")
    tv, sv = teacher.model.config.vocab_size, student.model.config.vocab_size
    if tv != sv:
        raise UsageError(f"teacher and student vocabularies differ ({tv} vs {sv} tokens); they must share a tokenizer")
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise UsageError(
            "teacher and student tokenizers differ (same size, different tokens); they must share a tokenizer"
        )


def hidden_map(student: torch.nn.Module, teacher: torch.nn.Module) -> list[int]:
    """Student layer -> teacher layer: the layer it came from when `compress prune` recorded
    it, else evenly spaced."""
    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    kept = getattr(student.config, "compress_kept_layers", None)
    if isinstance(kept, list) and len(kept) == n_s and max(kept) < n_t:
        return list(kept)
    try:
        return layer_map(n_s, n_t)
    except ValueError as exc:
        raise UsageError(f"hidden-state matching: {exc}") from None


def training_text(
    stage: DistillStage, tokenizer, layout: traindata.Layout, steps: int, teacher, accelerator, say
) -> traindata.TrainData:
    """The stage's training windows. Generated text (alone or in a mix) is sampled from the teacher: --samples
    windows, by default as many as the run reads (one pass, no window seen twice); the main process samples it and
    the others read it back from the cache, so every process trains on the same windows."""
    sampled = generated.NAME in textdata.parts(stage.dataset)
    count = stage.samples or (steps * layout.per_step if sampled else None)

    def load() -> traindata.TrainData:
        return traindata.load(tokenizer, stage.dataset, stage.text_column, stage.seq_len, layout, count, teacher)

    if not sampled:
        return load()
    if accelerator.is_main_process:
        say(f"distill: sampling {count} x {stage.seq_len} tokens of training text from the teacher ...")
        train = load()
    accelerator.wait_for_everyone()  # the others read what the main process sampled, from the cache
    return train if accelerator.is_main_process else load()


def run(
    stage: DistillStage,
    student: loading.Loaded,
    teacher_src: Source,
    recipe_dtype: str,
    device: str,
    heldout: torch.Tensor | None,
    workdir: Path,
    resume: bool,
    masked: bool,
    console: Console,
    trust_remote_code: bool = False,
) -> StageResult:
    """masked: the student is sparse; its zeros stay zeros."""
    start = time.perf_counter()
    accelerator = accelerator_for(stage, device)
    main = accelerator.is_main_process
    say = console.print if main else (lambda *a, **k: None)
    say(f"distill: loading the teacher {teacher_src.spec} ...")
    teacher = loading.load(teacher_src, "float32" if device == "cpu" else recipe_dtype, device, trust_remote_code)
    check_pair(teacher, student)
    model, layout = student.model, traindata.Layout(stage.batch_size, stage.grad_accum, accelerator.num_processes)
    steps = stage.total_steps(layout.per_step)
    train = training_text(stage, student.tokenizer, layout, steps, teacher.model, accelerator, say)
    saved_dtype = next(model.parameters()).dtype
    model.float()  # float32 master weights; autocast (when on) computes in bfloat16
    if not stage.train_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    linears, _ = arch.quant_targets(model, [])
    masks = constraints.SparsityMasks(linears) if masked else None
    grids = student.quantized.grids if student.quantized else {}
    fake = constraints.FakeQuant({n: linears[n] for n in grids if n in linears}, grids) if grids else None

    def ppl(m: torch.nn.Module) -> float | None:
        return None if heldout is None else round(perplexity(m, heldout), 4)

    say("distill: held-out perplexity of the teacher and the student before training ...")
    before_t, before_s = ppl(teacher.model), ppl(model)
    opts = trainer.Options(
        steps=steps,
        layout=layout,
        lr=stage.lr,
        warmup_steps=round(stage.warmup * steps),
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        temperature=stage.temperature,
        loss=stage.loss,
        kd_weight=stage.kd_weight,
        hidden_weight=stage.hidden_weight,
        hidden_loss=stage.hidden_loss,
        lm_weight=stage.lm_weight,
        checkpoint_every=stage.checkpoint_every,
        seed=stage.seed,
    )
    hmap = hidden_map(model, teacher.model) if stage.hidden_weight > 0 else None
    compute = "bfloat16 autocast" if accelerator.mixed_precision == "bf16" else "float32"
    say(
        f"distill: {steps} steps x {layout.per_step} windows x {stage.seq_len} tokens, {accelerator.num_processes} "
        f"process(es), {compute}"
    )
    with Progress(
        TextColumn("distill"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not main,
    ) as bar:
        task = bar.add_task("train", total=steps, info="")

        def on_step(row: dict) -> None:
            tps = layout.per_step * stage.seq_len / max(row["seconds"], 1e-9)
            bar.update(task, completed=row["step"], info=f"loss {row['loss']:.4f}  {tps:,.0f} tok/s")

        history = trainer.train(
            model,
            teacher.model,
            train,
            opts,
            accelerator,
            workdir / "checkpoints",
            resume,
            hmap,
            after_step=masks.apply if masks else (lambda: None),
            on_step=on_step,
        )
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.get_input_embeddings().requires_grad_(True)
    after_s = ppl(model)
    quantized = fake.remove() if fake else None
    model.to(saved_dtype)
    del teacher
    training = Training(
        steps=steps,
        resumed_from=history.resumed_from,
        tokens=history.tokens,
        seconds=round(history.seconds, 2),
        tokens_per_s=round(history.tokens / history.seconds, 1) if history.seconds else None,
        processes=accelerator.num_processes,
        compute=compute,
        text=train.description,
        curve=history.curve,
        teacher_perplexity=before_t,
        student_perplexity_before=before_s,
        student_perplexity_after=after_s,
        masked_zeros=masks.zeros() if masks else None,
        fake_quantized=len(fake.linears) if fake else 0,
    )
    settings = {k: v for k, v in stage.model_dump().items() if k not in ("stage", "dataset", "text_column")}
    settings |= {"teacher": teacher_src.spec, "steps": steps, "hidden_map": hmap}
    record = StageRecord(
        stage="distill",
        settings=settings,
        layers=len(linears),
        ignored=[],
        seconds=time.perf_counter() - start,
        calibration=train.description,
        training=training,
    )
    if not quantized:
        return StageResult(record, [])
    # A quantized student is saved quantized again, on its own grids.
    weights = {n: QuantizedWeight(q, p.scale, p.zero_point) for n, (q, p) in quantized.items()}
    ct_format.compress_linears(model, student.quantized.config, weights)
    return StageResult(record, sorted(quantized), compressor=ct_format.finish(model, set(quantized)))
