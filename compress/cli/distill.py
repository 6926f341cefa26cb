"""`compress distill --teacher T --student S -o OUT`: knowledge distillation, teacher -> student."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Optional

import typer

from compress.cli.common import (
    AllowPickle,
    Device,
    EvalAlso,
    EvalDataset,
    EvalTokens,
    Evaluate,
    Json,
    Kl,
    Latency,
    Output,
    Overwrite,
    SaveRecipe,
    Tasks,
    TextColumn,
    TrustRemoteCode,
    default,
    execute,
    one_stage,
)
from compress.recipe import DISTILL_STEPS, DistillStage, EvalSpec, Recipe

_eval = partial(default, EvalSpec)  # the recipe's defaults, written once there
_run = partial(default, Recipe)  # the recipe's defaults, written once there
_stage = partial(default, DistillStage)  # the recipe's defaults, written once there


def distill(
    teacher: Annotated[str, typer.Option(help="The teacher: HF directory, .gguf, hub id, or built-in (smollm2-135m)")],
    student: Annotated[
        str,
        typer.Option(
            help="The student, sharing the teacher's tokenizer: any checkpoint, including compress prune/quantize "
            "outputs"
        ),
    ],
    output: Output,
    dataset: Annotated[
        str,
        typer.Option(
            help="Training text: 'builtin', 'generated' (sampled from the teacher), a .txt/.jsonl/.parquet path or "
            "folder, a hub dataset, or a mix of them joined by + (builtin+generated)"
        ),
    ] = _stage("dataset"),
    text_column: TextColumn = _stage("text_column"),
    samples: Annotated[
        Optional[int],
        typer.Option(
            help="Training windows to read (default: all the text holds; generated: as many as the run reads)"
        ),
    ] = _stage("samples"),
    steps: Annotated[Optional[int], typer.Option(help=f"Optimizer steps (default {DISTILL_STEPS})")] = default(
        DistillStage, "steps"
    ),
    tokens: Annotated[Optional[int], typer.Option(help="Training tokens instead of --steps")] = default(
        DistillStage, "tokens"
    ),
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence")] = _stage("seq_len"),
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch, per process")] = default(
        DistillStage, "batch_size"
    ),
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step")] = default(
        DistillStage, "grad_accum"
    ),
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW; warm-up then cosine decay)")] = default(
        DistillStage, "lr"
    ),
    warmup: Annotated[float, typer.Option(help="Share of the steps spent warming up")] = default(
        DistillStage, "warmup"
    ),
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = _stage("weight_decay"),
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: none)")] = default(
        DistillStage, "max_grad_norm"
    ),
    loss: Annotated[str, typer.Option(help="Logit loss: kl | reverse-kl | jsd")] = _stage("loss"),
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the logit loss")] = default(
        DistillStage, "temperature"
    ),
    kd_weight: Annotated[float, typer.Option(help="Weight of the logit loss")] = _stage("kd_weight"),
    hidden_weight: Annotated[float, typer.Option(help="Weight of hidden-state matching (0: off)")] = default(
        DistillStage, "hidden_weight"
    ),
    hidden_loss: Annotated[str, typer.Option(help="Hidden-state loss: mse | cosine")] = default(
        DistillStage, "hidden_loss"
    ),
    lm_weight: Annotated[float, typer.Option(help="Weight of the plain next-token loss (0: off)")] = default(
        DistillStage, "lm_weight"
    ),
    train_embeddings: Annotated[
        bool, typer.Option(help="Also train the token embeddings (and a tied output layer)")
    ] = _stage("train_embeddings"),
    autocast: Annotated[str, typer.Option(help="auto (bf16 where it multiplies faster) | bf16 | off")] = default(
        DistillStage, "autocast"
    ),
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in the backward pass (less memory)")
    ] = _stage("gradient_checkpointing"),
    checkpoint_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints")] = default(
        DistillStage, "checkpoint_every"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the data order")] = _stage("seed"),
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint")] = False,
    dtype: Annotated[str, typer.Option(help="Saved dtype: auto (the student's) | bfloat16 | float16 | float32")] = _run(
        "dtype"
    ),
    device: Device = _run("device"),
    eval_dataset: EvalDataset = _eval("dataset"),
    eval_also: EvalAlso = _eval("also"),
    eval_tokens: EvalTokens = _eval("max_tokens"),
    evaluate: Evaluate = _eval("enabled"),
    latency: Latency = _eval("latency"),
    kl: Kl = _eval("kl_divergence"),
    tasks: Tasks = "",
    overwrite: Overwrite = _run("overwrite"),
    trust_remote_code: TrustRemoteCode = _run("trust_remote_code"),
    allow_pickle: AllowPickle = _run("allow_pickle"),
    save_recipe: SaveRecipe = None,
    json: Json = False,
) -> None:
    """Train the student to match the teacher (logits, hidden states, next-token loss)."""
    stage = {
        "stage": "distill",
        "teacher": teacher,
        "steps": steps,
        "tokens": tokens,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm,
        "loss": loss,
        "temperature": temperature,
        "kd_weight": kd_weight,
        "hidden_weight": hidden_weight,
        "hidden_loss": hidden_loss,
        "lm_weight": lm_weight,
        "train_embeddings": train_embeddings,
        "autocast": autocast,
        "gradient_checkpointing": gradient_checkpointing,
        "checkpoint_every": checkpoint_every,
        "seed": seed,
        "dataset": dataset,
        "text_column": text_column,
        "samples": samples,
    }
    recipe = one_stage(
        stage,
        model=student,
        output=output,
        overwrite=overwrite,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        evaluate=evaluate,
        eval_dataset=eval_dataset,
        eval_also=eval_also,
        text_column=text_column,
        eval_tokens=eval_tokens,
        latency=latency,
        kl=kl,
        tasks=tasks,
    )
    execute(recipe, save_recipe, json, resume=resume)
