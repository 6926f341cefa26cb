"""Calibration and training windows: from text, sampled from the model (`generated`), or a mix of both."""

from __future__ import annotations

import torch

from compress.data import generated, text as textdata, tokens
from compress.errors import UsageError

CALIBRATION_BATCH = 4  # calibration windows per forward pass
MIX_SEED = 0  # the order a mix's windows are shuffled into


def windows(
    dataset: str, text_column: str, tokenizer, seq_len: int, count: int | None, model=None
) -> tuple[torch.Tensor, str, list[str]]:
    """[N, seq_len] windows of `dataset` (count: at most that many; None: all a text holds), their description and
    warnings. A mix (`builtin+generated`) takes an equal share of `count` from each source (a text with fewer gives
    what it has), shuffled together. `generated` is sampled from `model` (data/generated.py), once: later calls read
    it back from the cache."""
    names = textdata.parts(dataset)
    if len(names) > 1 and count is None:
        raise UsageError(f"a mix ({dataset}) needs a count of windows to share out between its sources")
    shares = [count] if len(names) == 1 else [count // len(names) + (i < count % len(names)) for i in range(len(names))]
    got, descs, warnings = [], [], []
    for name, share in zip(names, shares):
        if name == generated.NAME:
            if model is None or share is None:
                raise UsageError(f"{generated.NAME} text is sampled from a model: a number of samples and a model")
            wins, desc = generated.windows(model, tokenizer, share, seq_len)
        else:
            texts = textdata.load(name, "calibration", text_column)
            wins = tokens.windows(tokenizer, texts.texts, seq_len, (share or 10**12) * seq_len)
            desc = f"{texts.description}; {len(wins)} samples x {seq_len} tokens"
            if len(wins) == 0:
                raise UsageError(f"{texts.description} is shorter than one sample of {seq_len} tokens; lower --seq-len")
            if share is not None and len(wins) < share:
                warnings.append(
                    f"{texts.description} holds {len(wins)} samples of {seq_len} tokens, fewer than the {share} asked; "
                    f"using {len(wins)}"
                )
        got.append(wins)
        descs.append(desc)
    if len(got) == 1:
        return got[0], descs[0], warnings
    mixed = torch.cat(got)
    order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(MIX_SEED))
    return mixed[order], "mix of " + " + ".join(descs), warnings


def batches(stage, tokenizer, console=None, model=None) -> tuple[list[torch.Tensor], str, list[str]]:
    """The stage's calibration text (its dataset, text_column, samples, seq_len) as batches of
    [B, seq_len] token windows; its description; warnings (fewer samples than asked), also
    printed on `console` when given. `generated`, alone or in a mix: sampled from `model`."""
    if console is not None and generated.NAME in textdata.parts(stage.dataset):
        console.print(f"calibration text: sampling from the model ({stage.dataset}, {stage.samples} samples) ...")
    wins, desc, warnings = windows(stage.dataset, stage.text_column, tokenizer, stage.seq_len, stage.samples, model)
    for w in warnings if console is not None else []:
        console.print(f"[yellow]warning:[/] {w}")
    return list(wins.split(CALIBRATION_BATCH)), desc, warnings
