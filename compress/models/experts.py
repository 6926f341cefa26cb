"""Mixture-of-experts blocks as linear layers, so that every method reaches the experts.

transformers 5 holds a block's experts as two fused 3-D tensors in one module (`gate_up_proj` [E, 2I, H] and
`down_proj` [E, H, I]); on disk, and for vLLM, they are per-expert linears (Mixtral's `experts.3.w1.weight`,
Qwen's `experts.3.gate_proj.weight`), which transformers' own conversion mapping merges on load and splits on
save. `unfuse` swaps each fused module for an `Experts` list of per-expert nn.Linear layers named as on disk and
computing the same outputs, so the layer-by-layer engine, every method and compressed-tensors treat the experts as
any linear, and `save_pretrained` writes them under the names transformers and vLLM read.

While calibrating (`calibrating(model)`), every expert also sees the tokens the router did not send it (as
llm-compressor's "calibrate all experts"): an expert the router rarely picks would otherwise get no statistics (a
zero Hessian, NaN scales). Only the routed tokens' outputs are combined, so the block's outputs do not change, and
each expert's routed token count is kept for the report.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import UsageError
from compress.primitives.qparams import INT8_ACTIVATIONS

COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # a config's expert count, by family
_SOURCE = re.compile(r"experts\.\*\.(\w+)\.weight$")


@dataclass(frozen=True)
class Names:
    """An expert's three linears as the checkpoint names them (Mixtral: w1, w3, w2)."""

    gate: str
    up: str
    down: str


class Expert(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its linears named as on disk."""

    def __init__(self, names: Names, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act) -> None:
        super().__init__()
        self.names = names
        self.act = act
        for name, w in ((names.gate, gate), (names.up, up), (names.down, down)):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=False)
            setattr(self, name, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.names
        return getattr(self, n.down)(self.act(getattr(self, n.gate)(x)) * getattr(self, n.up)(x))


class Experts(nn.ModuleList):
    """Per-expert linears in place of a fused experts module; called as it is, (hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]."""

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.all_tokens = False  # calibrating: every expert reads every token
        self.routed: list[torch.Tensor] = []  # per call while calibrating: [E] tokens the router sent each expert

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        if self.all_tokens:
            self.routed.append(torch.bincount(top_k_index.flatten().cpu(), minlength=self.num_experts))
        # [k, T] as transformers' fused loop walks it, so the sums come out in its order
        chosen = top_k_index.T
        for e, expert in enumerate(self):
            pos, tok = torch.where(chosen == e)
            if self.all_tokens:
                y = expert(hidden)[tok]  # the same `hidden` for every expert: one set of statistics for them all
            elif tok.numel():
                y = expert(hidden[tok])
            else:
                continue
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def checkpoint_names(model: nn.Module) -> Names | None:
    """The per-expert linear names transformers' conversion mapping merges into `experts.gate_up_proj` and
    `experts.down_proj` for this model (None: it has no such mapping)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    found: dict[str, list[str]] = {}
    for conv in get_model_conversion_mapping(model, add_legacy=False):
        if not isinstance(conv, WeightConverter):
            continue
        names = [m.group(1) for s in conv._original_source_patterns if (m := _SOURCE.search(s))]
        for target in conv._original_target_patterns:
            if target.endswith("experts.gate_up_proj") and len(names) == 2:
                found["gate_up"] = names
            elif target.endswith("experts.down_proj") and len(names) == 1:
                found["down"] = names
    if set(found) != {"gate_up", "down"}:
        return None
    return Names(found["gate_up"][0], found["gate_up"][1], found["down"][0])


def in_memory(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Module names as a checkpoint writes them -> as the model holds them, through transformers' renamings
    (Mixtral's and PhiMoE's `block_sparse_moe` is `mlp` in transformers 5)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [c for c in get_model_conversion_mapping(model, add_legacy=False) if isinstance(c, WeightRenaming)]
    return {n: apply_renamings(f"{n}.weight", renamings).removesuffix(".weight") for n in names}


def expert_count(config) -> tuple[str, int] | None:
    """The key holding a config's expert count and the count (a config object or config.json's dict); None when it
    states none."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    key = next((k for k in COUNT_KEYS if isinstance(cfg.get(k), int)), None)
    return None if key is None else (key, cfg[key])


def keep_count(total: int, keep: float | int) -> int:
    """`--experts-keep` as a number of experts: a share below 1 (rounded), else a count."""
    return round(total * keep) if isinstance(keep, float) and keep < 1 else int(keep)


def fused_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Fused experts modules (name -> module): exactly the parameters `gate_up_proj` [E, 2I, H] and `down_proj`
    [E, H, I], and an activation. Others (biases, transposed layouts, clamped activations) are not matched."""
    out = {}
    for name, m in model.named_modules():
        params = dict(m.named_parameters(recurse=False))
        if set(params) != {"gate_up_proj", "down_proj"} or not hasattr(m, "act_fn"):
            continue
        gu, d = params["gate_up_proj"], params["down_proj"]
        if gu.dim() == 3 and d.dim() == 3 and gu.shape[0] == d.shape[0] and gu.shape[1] == 2 * d.shape[2]:
            if gu.shape[2] == d.shape[1]:
                out[name] = m
    return out


@torch.no_grad()
def unfuse(model: nn.Module) -> list[str]:
    """Swap every fused experts module for per-expert linears (in place, sharing no memory with the fused
    tensors); the names of the routers' linear layers (kept in full precision). Experts whose on-disk names
    transformers does not state stay fused (nothing reaches them; the quantize stage warns). Raises UsageError for
    experts that compute something else than gate/up/down."""
    fused = fused_modules(model)
    if not fused:
        return []
    # the block's own linears outside the experts (its router, Qwen2-MoE's shared_expert_gate) weigh or pick experts
    parents = {name.rpartition(".")[0] for name in fused}
    routers = sorted(
        f"{p}.{n}" for p in parents for n, m in model.get_submodule(p).named_children() if isinstance(m, nn.Linear)
    )
    names = checkpoint_names(model)
    if names is None:
        return routers  # no per-expert layout to store them in: they stay as they are, and the stage says so
    for name, module in fused.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        half = module.gate_up_proj.shape[1] // 2
        experts = Experts(
            [
                Expert(names, gu[:half].clone(), gu[half:].clone(), d.clone(), module.act_fn)
                for gu, d in zip(module.gate_up_proj.data, module.down_proj.data)
            ]
        )
        _check_same(module, experts, name)
        setattr(parent, child, experts)
    return routers


def router_linears(model: nn.Module) -> list[str]:
    """Linear layers scoring the experts (as many outputs as the config has experts): rounding them changes which
    experts run, so they stay in full precision, wherever the experts themselves are (fused in a layout `unfuse`
    does not know, as Llama 4's router beside its experts)."""
    count = expert_count(model.config)
    if count is None:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == count[1]]


def check_rereadable(model: nn.Module) -> None:
    """Refuse experts transformers re-reads per expert from a compressed-tensors checkpoint (it swaps Llama 4's fused
    experts for a list of per-expert linears before loading) while compress writes them fused: the reload would
    start those experts from random values."""
    from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION
    from transformers.utils.quantization_config import QuantizationMethod

    for name, m in model.named_modules():
        entry = MODULES_TO_PATCH_FOR_QUANTIZATION.get(type(m).__name__)
        if entry and QuantizationMethod.COMPRESSED_TENSORS in entry["quantization_methods"]:
            raise UsageError(
                f"{name} ({type(m).__name__}): transformers reads these experts back one by one from a "
                "compressed-tensors checkpoint, and compress writes them fused, so they would reload as random values; "
                "this architecture cannot be quantized or stored sparse yet"
            )


def check_loadable(symmetric: bool, act: str | None) -> None:
    """Refuse what transformers (5.24) cannot load as experts: its per-expert de-quantizer drops zero points
    ("Asymmetric quant requires zero-point values") and reads no int8 experts beside int8 activations."""
    if not symmetric:
        raise UsageError(
            "mixture of experts: transformers cannot load experts with zero points (its expert loader drops them); "
            "quantize symmetric (drop --no-symmetric)"
        )
    if act in INT8_ACTIVATIONS:
        raise UsageError(
            "mixture of experts: transformers cannot load int8 experts stored for int8 activations (w8a8); "
            "use w8a16 or fp8"
        )


def _check_same(fused: nn.Module, experts: Experts, name: str) -> None:
    """The per-expert module computes what the fused one does, on random tokens routed at random."""
    gen = torch.Generator().manual_seed(0)
    w = fused.gate_up_proj
    hidden = torch.randn(16, w.shape[2], generator=gen).to(w.dtype)
    k = min(2, experts.num_experts)
    index = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:k] for _ in range(16)])
    weights = torch.rand(16, k, generator=gen).to(w.dtype)
    want, got = fused(hidden, index, weights), experts(hidden, index, weights)
    if not torch.allclose(want.float(), got.float(), rtol=1e-3, atol=1e-3 * float(want.abs().max())):
        raise UsageError(f"{name}: {type(fused).__name__} computes something else than gate/up/down experts")


@contextlib.contextmanager
def calibrating(model: nn.Module):
    """Every expert reads every token while inside (routed outputs only are combined)."""
    blocks = [m for m in model.modules() if isinstance(m, Experts)]
    for b in blocks:
        b.all_tokens, b.routed = True, []
    try:
        yield
    finally:
        for b in blocks:
            b.all_tokens = False


def routed_tokens(model: nn.Module, batches: int) -> dict[str, list[int]]:
    """Per experts module: the tokens the router sent each expert in its first `batches` calls while calibrating
    (the layer-by-layer engine's first pass over the calibration batches; later passes repeat them)."""
    return {
        name: [int(c) for c in sum(m.routed[:batches])]
        for name, m in model.named_modules()
        if isinstance(m, Experts) and m.routed
    }
