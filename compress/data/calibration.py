"""Calibration batches: windows of calibration text, a few per forward pass."""

from __future__ import annotations

import torch

from compress.data import generated, text as textdata, tokens
from compress.errors import UsageError

CALIBRATION_BATCH = 4  # calibration windows per forward pass


def batches(stage, tokenizer, console=None, model=None) -> tuple[list[torch.Tensor], str, list[str]]:
    """The stage's calibration text (its dataset, text_column, samples, seq_len) as batches of
    [B, seq_len] token windows; its description; warnings (fewer samples than asked), also
    printed on `console` when given. `generated`: sampled from `model` (data/generated.py)."""
    if stage.dataset == generated.NAME:
        if model is None:
            raise UsageError("--dataset generated is for calibration: the model samples it")
        if console is not None:
            console.print(f"calibration text: sampling {stage.samples} x {stage.seq_len} tokens from the model ...")
        wins, desc = generated.windows(model, tokenizer, stage.samples, stage.seq_len)
        return list(wins.split(CALIBRATION_BATCH)), desc, []
    texts = textdata.load(stage.dataset, "calibration", stage.text_column)
    wins = tokens.windows(tokenizer, texts.texts, stage.seq_len, stage.samples * stage.seq_len)
    warnings = []
    if len(wins) == 0:
        raise UsageError(
            f"calibration text ({texts.description}) is shorter than one sample of {stage.seq_len} tokens; "
            "lower --seq-len"
        )
    if len(wins) < stage.samples:
        warnings.append(
            f"calibration text holds {len(wins)} samples of {stage.seq_len} tokens, fewer than the "
            f"{stage.samples} asked; using {len(wins)}"
        )
    for w in warnings if console is not None else []:
        console.print(f"[yellow]warning:[/] {w}")
    desc = f"{texts.description}; {len(wins)} samples x {stage.seq_len} tokens"
    return list(wins.split(CALIBRATION_BATCH)), desc, warnings
