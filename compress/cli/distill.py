"""`compress distill --teacher T --student S -o OUT`: knowledge distillation, teacher -> student."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from compress.cli.common import (
    AllowPickle,
    Device,
    EvalDataset,
    EvalTokens,
    Evaluate,
    Json,
    Latency,
    Output,
    Overwrite,
    SaveRecipe,
    TextColumn,
    TrustRemoteCode,
    execute,
    one_stage,
)


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
        str, typer.Option(help="Training text: 'builtin', a .txt/.jsonl/.parquet path or folder, or a hub dataset")
    ] = "builtin",
    text_column: TextColumn = "text",
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default 100)")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="Training tokens instead of --steps")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence")] = 256,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch, per process")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW; warm-up then cosine decay)")] = 2e-4,
    warmup: Annotated[float, typer.Option(help="Share of the steps spent warming up")] = 0.05,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: none)")] = 1.0,
    loss: Annotated[str, typer.Option(help="Logit loss: kl | reverse-kl | jsd")] = "kl",
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the logit loss")] = 1.0,
    kd_weight: Annotated[float, typer.Option(help="Weight of the logit loss")] = 1.0,
    hidden_weight: Annotated[float, typer.Option(help="Weight of hidden-state matching (0: off)")] = 0.0,
    hidden_loss: Annotated[str, typer.Option(help="Hidden-state loss: mse | cosine")] = "mse",
    lm_weight: Annotated[float, typer.Option(help="Weight of the plain next-token loss (0: off)")] = 1.0,
    train_embeddings: Annotated[
        bool, typer.Option(help="Also train the token embeddings (and a tied output layer)")
    ] = False,
    autocast: Annotated[str, typer.Option(help="auto (bf16 on GPUs that have it) | bf16 | off")] = "auto",
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in the backward pass (less memory)")
    ] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the data order")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint")] = False,
    dtype: Annotated[
        str, typer.Option(help="Saved dtype: auto (the student's) | bfloat16 | float16 | float32")
    ] = "auto",
    device: Device = "cpu",
    eval_dataset: EvalDataset = "builtin",
    eval_tokens: EvalTokens = 8192,
    evaluate: Evaluate = True,
    latency: Latency = True,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle: AllowPickle = False,
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
        text_column=text_column,
        eval_tokens=eval_tokens,
        latency=latency,
    )
    execute(recipe, save_recipe, json, resume=resume)
