"""Expert pruning: remove the experts of a mixture of experts that matter least, so the tensors really shrink and
the rewritten config loads in plain transformers.

An expert's saliency is REAP's (Lasby et al., 2025, "REAP the experts"): over the calibration tokens the router sends
it, the mean of router weight x the norm of the expert's output, g_e(x) * ||f_e(x)||. An expert the router seldom
picks, or whose output barely moves the residual stream, goes; one never picked scores 0. Every MoE layer keeps the
same number (transformers' configs have one expert count per model); layer by layer, each scored on the outputs of
the layers before it as already pruned. The router keeps the rows of the kept experts, so it picks among them as
before. Fused experts (transformers 5: `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from compress import calibrate
from compress.errors import UsageError
from compress.method import CLI_TEXT
from compress.models import experts as experts_model
from compress.models.arch import decoder_layers
from compress.models.experts import COUNT_KEYS, fused_modules
from compress.prune.method import PruneMethod


def _share_or_count(value):
    """'0.5' -> a share of the experts; '4' -> that many."""
    if not isinstance(value, str):
        return value
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        raise ValueError(f"--experts-keep takes a share (0.5) or a count (4), got {value!r}") from None


class ExpertsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experts_keep: Annotated[float | int | None, BeforeValidator(_share_or_count)] = Field(
        None,
        gt=0,
        description="experts: experts to keep in every MoE layer, a share (0.5) or a count (4)",
        json_schema_extra=CLI_TEXT,
    )


def expert_count(config) -> tuple[str, int]:
    """The config key holding the expert count, and the count."""
    counted = experts_model.expert_count(config)
    if counted is None:
        raise UsageError(f"{config.model_type}: its config states no expert count ({', '.join(COUNT_KEYS)})")
    return counted


def kept(total: int, top_k: int, keep: float | int) -> int:
    """Experts each layer keeps: a share (rounded) or a count; more than the router's top-k, fewer than all."""
    n = experts_model.keep_count(total, keep)
    if not top_k <= n < total:
        raise UsageError(
            f"--experts-keep {keep}: the model has {total} experts per layer and routes each token to {top_k}; "
            f"keep between {top_k} and {total - 1}"
        )
    return n


def check(model: torch.nn.Module, keep: float | int) -> int:
    """Refuse what cannot be done, before any calibration; the experts each layer keeps."""
    fused = fused_modules(model)
    if not fused:
        raise UsageError(
            f"{model.config.model_type}: no mixture-of-experts layers with fused gate/up/down experts to prune"
        )
    _, total = expert_count(model.config)
    if getattr(model.config, "n_group", None) not in (None, 1):
        raise UsageError(
            f"{model.config.model_type}: group-limited routing (n_group {model.config.n_group}) picks experts by "
            "groups of fixed size; pruning them is not supported"
        )
    top_k = getattr(model.config, "num_experts_per_tok", None) or 1
    return kept(total, top_k, keep)


class Saliency:
    """REAP saliency of each expert of one fused experts module, accumulated over forward calls."""

    def __init__(self, experts: torch.nn.Module) -> None:
        n = experts.gate_up_proj.shape[0]
        self.experts, self.sum, self.tokens = experts, torch.zeros(n, dtype=torch.float64), torch.zeros(n)

    def __call__(self, module, args, output) -> None:
        hidden, index, weights = args[:3]  # [T, H], [T, k], [T, k]
        m = self.experts
        for e in range(self.sum.numel()):
            pos, tok = torch.where(index.T == e)
            if not tok.numel():
                continue
            gate, up = F.linear(hidden[tok], m.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(m.act_fn(gate) * up, m.down_proj[e])  # [n, H]
            self.sum[e] += float((weights[tok, pos].float() * y.float().norm(dim=-1)).sum())
            self.tokens[e] += tok.numel()

    def scores(self) -> torch.Tensor:
        return (self.sum / self.tokens.clamp(min=1)).float()


@torch.no_grad()
def prune_block(block: torch.nn.Module, experts_name: str, keep: torch.Tensor) -> None:
    """Keep these experts (sorted indices) of a MoE block: the experts' tensors and the router's rows for them."""
    experts = block.get_submodule(experts_name)
    total = experts.gate_up_proj.shape[0]
    hidden = experts.gate_up_proj.shape[2]
    for name in ("gate_up_proj", "down_proj"):
        setattr(experts, name, torch.nn.Parameter(getattr(experts, name).data[keep].contiguous(), requires_grad=False))
    routers = [
        m
        for n, m in block.named_children()
        if n != experts_name and getattr(m, "weight", None) is not None and tuple(m.weight.shape) == (total, hidden)
    ]
    if len(routers) != 1:
        raise UsageError(f"{type(block).__name__}: no single router of shape [{total}, {hidden}] beside its experts")
    router = routers[0]
    for name, p in list(router.named_parameters(recurse=False)):
        setattr(router, name, torch.nn.Parameter(p.data[keep].contiguous(), requires_grad=False))
    for name, b in list(router.named_buffers(recurse=False)):
        if b.dim() >= 1 and b.shape[0] == total:
            router._buffers[name] = b[keep].contiguous()
    for m in block.modules():
        for key in COUNT_KEYS:
            if getattr(m, key, None) == total:
                setattr(m, key, keep.numel())


class Experts(PruneMethod):
    name = "experts"
    Options = ExpertsOptions
    structured = True

    shrinks = "whole experts go"

    @classmethod
    def check(cls, stage) -> None:
        if stage.experts_keep is None:
            raise ValueError("expert pruning needs experts_keep (a share such as 0.5, or a count)")
        super().check(stage)

    def settings(self) -> dict:
        return {"experts_keep": self.options.experts_keep}

    def check_model(self, model: torch.nn.Module) -> None:
        check(model, self.options.experts_keep)

    def needs_data(self) -> bool:
        return True

    def run(
        self,
        model: torch.nn.Module,
        batches: list[torch.Tensor] | None,
        device: torch.device,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict:
        """Score and prune layer by layer, rewrite the config; the settings to report."""
        n_keep = check(model, self.options.experts_keep)
        key, total = expert_count(model.config)
        dropped: dict[int, list[int]] = {}

        def calibrate_layer(i: int, layer: torch.nn.Module, inputs: calibrate.LayerInputs) -> None:
            for name, experts in fused_modules(layer).items():
                saliency = Saliency(experts)
                hook = experts.register_forward_hook(saliency)
                try:
                    calibrate.run_layer(layer, inputs)
                finally:
                    hook.remove()
                scores = saliency.scores()
                keep = torch.topk(scores, n_keep).indices.sort().values
                block_name, _, experts_name = name.rpartition(".")
                prune_block(layer.get_submodule(block_name), experts_name, keep)
                dropped[i] = sorted(set(range(total)) - set(keep.tolist()))

        calibrate.layer_by_layer(model, batches, device, calibrate_layer, progress)
        setattr(model.config, key, n_keep)
        return {
            "method": self.name,
            "experts_keep": self.options.experts_keep,
            "experts": f"{total} -> {n_keep} in each of {len(dropped)} layers (of {len(decoder_layers(model))})",
            "saliency": "REAP: mean over routed calibration tokens of router weight x expert output norm",
            "dropped_experts": {str(i): d for i, d in dropped.items()},
        }
