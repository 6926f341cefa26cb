"""Which layers of a model a method may touch. Per-architecture knowledge lives here."""

from __future__ import annotations

import torch
from compressed_tensors.utils.match import is_match, match_named_modules

from compress.errors import UsageError

TARGETS = ["Linear"]


def output_layer_names(model: torch.nn.Module) -> list[str]:
    """Names of the output projection (lm_head or its equivalent), kept in full precision."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    return [n for n, m in model.named_modules() if head is not None and m is head] or []


def check_supported(model: torch.nn.Module) -> None:
    from transformers.pytorch_utils import Conv1D

    conv = next((n for n, m in model.named_modules() if isinstance(m, Conv1D)), None)
    if conv is not None:
        raise UsageError(
            f"{type(model).__name__} uses GPT-2 style Conv1D layers ({conv}); compressed-tensors "
            "only stores nn.Linear, so transformers could not reload the result"
        )


def quant_targets(model: torch.nn.Module, extra_ignore: list[str]) -> tuple[dict[str, torch.nn.Linear], list[str]]:
    """Linear layers to quantize (compressed-tensors' own matching) and the ignore list used."""
    check_supported(model)
    ignore = output_layer_names(model) + list(extra_ignore)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for pattern in extra_ignore:
        if not any(is_match(n, m, pattern) for n, m in linears):
            raise UsageError(f"--ignore {pattern!r} matches no linear layer (names look like {linears[0][0]!r})")
    targets = dict(match_named_modules(model, TARGETS, ignore))
    if not targets:
        raise UsageError(f"{type(model).__name__}: no linear layers left to quantize")
    return targets, ignore
