"""Structured pruning: drop whole decoder layers, MLP channels and attention heads, so the
tensors really shrink and the rewritten config loads in plain transformers.

Importance comes from one layer-by-layer pass over calibration text on the unpruned model:
- a layer: its block influence, 1 - mean cos(input, output) over tokens (Men et al., 2024,
  "ShortGPT"): a layer that barely turns the residual stream can go;
- an MLP channel j: E[a_j^2] * ||W_down[:, j]||^2, the energy it adds to the output;
- a query head: E||x_h W_o,h^T||^2, the energy of its share of the attention output.
Every layer keeps the same shapes (transformers' configs have one width per model).
Dropping layers works on any decoder; heads and MLP channels need llama-style blocks
(self_attn.q/k/v/o_proj, mlp.gate/up/down_proj: llama, mistral, qwen2/3, gemma, granite, ...).
Whatever the architecture, the rewritten config must rebuild exactly the pruned tensors, or
nothing is written (`check_rebuilds`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from compress import calibrate
from compress.errors import UsageError
from compress.method import CLI_TEXT
from compress.models.arch import decoder_layers
from compress.prune.method import PruneMethod

HEADS = tuple(f"self_attn.{p}_proj" for p in "qkvo")
CHANNELS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Plan:
    drop_layers: int | list[int] | None = None
    mlp_keep: float | None = None
    heads_keep: float | None = None


@dataclass
class Importance:
    layers: list[float] = field(default_factory=list)  # [L] block influence
    channels: list[torch.Tensor] = field(default_factory=list)  # per layer [intermediate]
    heads: list[torch.Tensor] = field(default_factory=list)  # per layer [num_heads]


def check(model: torch.nn.Module, plan: Plan) -> None:
    """Refuse what cannot be done, before any calibration runs."""
    cfg = model.config
    kind = getattr(cfg, "model_type", type(model).__name__)
    blocks = decoder_layers(model)
    need = (HEADS if plan.heads_keep is not None else ()) + (CHANNELS if plan.mlp_keep is not None else ())
    for i, layer in enumerate(blocks):
        missing = [n for n in need if not isinstance(_get(layer, n), torch.nn.Linear)]
        if missing:
            raise UsageError(
                f"{kind}: --heads-keep and --mlp-keep need llama-style blocks (self_attn.q/k/v/o_proj, "
                f"mlp.gate/up/down_proj); layer {i} has no linear {missing[0]} (--drop-layers works on any decoder)"
            )
        if plan.heads_keep is not None:
            width = layer.self_attn.q_proj.out_features
            across = [n for n, m in layer.self_attn.named_modules() if getattr(m, "weight", None) is not None
                      and m.weight.dim() == 1 and m.weight.numel() == width]  # fmt: skip
            if across:
                raise UsageError(
                    f"{kind}: self_attn.{across[0]} normalizes across all query heads at once, so removing heads "
                    "would change what it computes; use --drop-layers or --mlp-keep"
                )
    n_layers = len(blocks)
    drop = plan.drop_layers
    if isinstance(drop, list):
        bad = [i for i in drop if not 0 <= i < n_layers]
        if bad:
            raise UsageError(f"--drop-layers {bad[0]}: the model has layers 0..{n_layers - 1}")
        if len(set(drop)) >= n_layers:
            raise UsageError(f"--drop-layers would drop all {n_layers} layers")
    elif isinstance(drop, int) and drop >= n_layers:
        raise UsageError(f"--drop-layers {drop}: the model has {n_layers} layers; at least one must stay")
    if plan.heads_keep is not None:
        heads_kept(cfg.num_attention_heads, _kv_heads(cfg), plan.heads_keep)
    if plan.drop_layers is None and plan.mlp_keep is None and plan.heads_keep is None:
        raise UsageError("structured pruning needs --drop-layers, --mlp-keep or --heads-keep")
    _rehearse(model, plan)


def _rehearse(model: torch.nn.Module, plan: Plan) -> None:
    """The plan applied to a weightless copy first, so a config that cannot describe the result is refused before
    any calibration runs."""
    with torch.device("meta"):
        ghost = type(model)._from_config(copy.deepcopy(model.config))
    blocks = decoder_layers(ghost)
    heads = torch.zeros(ghost.config.num_attention_heads) if plan.heads_keep is not None else None
    chans = _get(blocks[0], CHANNELS[-1])
    imp = Importance(
        layers=[0.0] * len(blocks),
        channels=[torch.zeros(chans.in_features)] * len(blocks) if plan.mlp_keep is not None else [],
        heads=[heads] * len(blocks) if heads is not None else [],
    )
    apply(ghost, plan, imp)


def heads_kept(heads: int, kv_heads: int, keep: float) -> int:
    """Query heads per key/value head after pruning: each group loses as many as the others."""
    per_group = heads // kv_heads
    kept = keep * per_group
    if abs(kept - round(kept)) > 0.01 or round(kept) < 1:
        valid = ", ".join(f"{k}/{per_group}" for k in range(1, per_group + 1))
        raise UsageError(
            f"--heads-keep {keep}: {heads} query heads share {kv_heads} key/value heads ({per_group} each); "
            f"grouped-query attention needs the same whole number kept per group: use {valid}"
        )
    return round(kept)


def _attn(layer):
    return layer.self_attn


def _get(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def measure_importance(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
    plan: Plan | None = None,
) -> Importance:
    """Per-layer importance; heads and channels only where `plan` prunes them (all when no plan):
    a layer-dropping plan on a block whose o_proj is not heads x head_dim (deepseek's MLA) must not
    reshape it."""
    imp = Importance()
    want_heads = plan is None or plan.heads_keep is not None
    want_channels = plan is None or plan.mlp_keep is not None
    head_dim = _head_dim(model.config)
    state: dict = {}

    def calibrate_layer(i: int, layer: torch.nn.Module, inputs: calibrate.LayerInputs) -> None:
        state["inputs"] = list(inputs.hidden)
        o_proj = _get(layer, HEADS[-1]) if want_heads else None
        down = _get(layer, CHANNELS[-1]) if want_channels else None
        heads = torch.zeros(model.config.num_attention_heads if o_proj is not None else 0, device=device)
        chans = torch.zeros(down.in_features if down is not None else 0, device=device)
        hooks = []
        if o_proj is not None:  # heads and channels: llama-style blocks only (`check`); layers: any
            w_o = o_proj.weight.float().reshape(o_proj.out_features, -1, head_dim)  # [H_out, heads, hd]
            hooks.append(o_proj.register_forward_pre_hook(lambda mod, args: on_o(w_o, args)))
        if down is not None:
            hooks.append(down.register_forward_pre_hook(lambda mod, args: on_down(args)))

        def on_o(w_o, args):
            x = args[0].float().reshape(-1, w_o.shape[1], head_dim)  # [n, heads, hd]
            y = torch.einsum("nhd,ohd->nho", x, w_o)  # each head's share of the output
            heads.add_(y.pow(2).sum((0, 2)))

        def on_down(args):
            chans.add_(args[0].reshape(-1, args[0].shape[-1]).float().pow(2).sum(0))

        state["hooks"] = hooks
        state["acc"] = (heads, chans, down)

    def on_outputs(i: int, outputs: list[torch.Tensor]) -> None:
        for h in state.pop("hooks"):
            h.remove()
        heads, chans, down = state.pop("acc")
        imp.heads.append(heads.cpu())
        imp.channels.append((chans * down.weight.float().pow(2).sum(0)).cpu() if down is not None else chans.cpu())
        cos = [
            torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean()
            for a, b in zip(state.pop("inputs"), outputs)
        ]
        imp.layers.append(1 - float(torch.stack(cos).mean()))

    calibrate.layer_by_layer(model, batches, device, calibrate_layer, progress, on_outputs=on_outputs)
    return imp


def _kv_heads(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _linear(
    old: torch.nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> torch.nn.Linear:
    w = old.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device="meta")
    new.weight = torch.nn.Parameter(w.contiguous(), requires_grad=False)
    if old.bias is not None:
        b = old.bias.data[rows] if rows is not None else old.bias.data
        new.bias = torch.nn.Parameter(b.contiguous(), requires_grad=False)
    return new


@torch.no_grad()
def apply(model: torch.nn.Module, plan: Plan, imp: Importance) -> dict:
    """Shrink the model in place and rewrite its config. Returns what was removed."""
    cfg = model.config
    blocks = decoder_layers(model)
    n_layers = len(blocks)
    done: dict = {}
    if plan.mlp_keep is not None:
        width = blocks[0].mlp.down_proj.in_features
        keep = max(8, round(width * plan.mlp_keep / 8) * 8) if width >= 8 else width  # multiples of 8 suit kernels
        for layer, score in zip(blocks, imp.channels):
            idx = torch.topk(score, keep).indices.sort().values
            mlp = layer.mlp
            mlp.gate_proj, mlp.up_proj = _linear(mlp.gate_proj, rows=idx), _linear(mlp.up_proj, rows=idx)
            mlp.down_proj = _linear(mlp.down_proj, cols=idx)
        cfg.intermediate_size = keep
        done["mlp_channels"] = f"{width} -> {keep} per layer"
    if plan.heads_keep is not None:
        hd, heads, kv = _head_dim(cfg), cfg.num_attention_heads, _kv_heads(cfg)
        per_group, kept = heads // kv, heads_kept(heads, kv, plan.heads_keep)
        for layer, score in zip(blocks, imp.heads):
            groups = score.reshape(kv, per_group)
            chosen = torch.topk(groups, kept, dim=1).indices.sort(dim=1).values + torch.arange(kv)[:, None] * per_group
            cols = (chosen.reshape(-1, 1) * hd + torch.arange(hd)).reshape(-1)  # their channels
            attn = _attn(layer)
            attn.q_proj = _linear(attn.q_proj, rows=cols)
            attn.o_proj = _linear(attn.o_proj, cols=cols)
            attn.num_key_value_groups = kept
        cfg.head_dim = hd  # no longer hidden_size / heads
        cfg.num_attention_heads = kept * kv
        done["attention_heads"] = f"{heads} -> {kept * kv} per layer (key/value heads: {kv})"
    if plan.drop_layers is not None:
        drop = plan.drop_layers
        if isinstance(drop, int):
            drop = sorted(torch.tensor(imp.layers).argsort()[:drop].tolist())
        kept = [i for i in range(n_layers) if i not in set(drop)]
        _set_layers(model, blocks, torch.nn.ModuleList([blocks[i] for i in kept]))
        for new_idx, layer in enumerate(decoder_layers(model)):
            for m in layer.modules():  # the KV cache indexes layers by it (attention's, some layers' own)
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = new_idx
        cfg.num_hidden_layers = len(kept)
        # Which original layer each kept one was: distillation matches hidden states by it.
        cfg.compress_kept_layers = [getattr(cfg, "compress_kept_layers", range(n_layers))[i] for i in kept]
        if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n_layers:
            cfg.layer_types = [cfg.layer_types[i] for i in kept]
        done["dropped_layers"] = sorted(drop)
    check_rebuilds(model)
    return done


def check_rebuilds(model: torch.nn.Module) -> None:
    """The rewritten config must build the pruned model's very tensors (names and shapes), as transformers will on
    reload: a config that ties a layer's kind to its index (mixtures of experts on every k-th layer, dense first
    layers) would reload other layers than the ones kept."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    with torch.device("meta"):
        fresh = type(model)._from_config(model.config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if want != got:
        key = next(k for k in sorted(want.keys() | got.keys()) if want.get(k) != got.get(k))
        raise UsageError(
            f"{kind}: after pruning, its rewritten config no longer describes the pruned layers ({key}: "
            f"{want.get(key, 'absent')} pruned, {got.get(key, 'absent')} on reload); nothing was written"
        )


def _set_layers(model: torch.nn.Module, old: torch.nn.ModuleList, new: torch.nn.ModuleList) -> None:
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise RuntimeError("decoder layer list not found")


def _layers(value):
    """'6' -> 6 layers chosen by importance; '3,5,7' -> those layers."""
    if not isinstance(value, str):
        return value
    try:
        return [int(v) for v in value.split(",")] if "," in value else int(value)
    except ValueError:
        raise ValueError(f"--drop-layers takes a count (6) or a list of layer indices (3,5,7), got {value!r}") from None


def _fraction(value):
    """'0.5' or '2/3' -> float."""
    if not isinstance(value, str):
        return value
    try:
        num, _, den = value.partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--heads-keep takes a share such as 0.5 or 2/3, got {value!r}") from None


def _at_least_one(value):
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise ValueError("drop_layers must be at least 1 (or a list of layer indices)")
    return value


class StructuredOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    drop_layers: Annotated[int | list[int] | None, BeforeValidator(_layers)] = Field(
        None,
        description="structured: how many decoder layers to drop (by importance), or which: 3,5,7",
        json_schema_extra=CLI_TEXT,
    )
    mlp_keep: float | None = Field(None, gt=0, le=1, description="structured: share of MLP channels to keep")
    heads_keep: Annotated[float | None, BeforeValidator(_fraction)] = Field(
        None,
        gt=0,
        le=1,
        description="structured: share of query heads to keep, e.g. 0.5 or 2/3 (whole heads per key/value group)",
        json_schema_extra=CLI_TEXT,
    )


class Structured(PruneMethod):
    name = "structured"
    Options = StructuredOptions
    structured = True

    @classmethod
    def check(cls, stage) -> None:
        _at_least_one(stage.drop_layers)
        if stage.drop_layers is None and stage.mlp_keep is None and stage.heads_keep is None:
            raise ValueError("structured pruning needs drop_layers, mlp_keep or heads_keep")
        super().check(stage)

    def settings(self) -> dict:
        return {k: v for k, v in self.options.model_dump().items() if v is not None}

    def plan(self) -> Plan:
        return Plan(self.options.drop_layers, self.options.mlp_keep, self.options.heads_keep)

    def check_model(self, model: torch.nn.Module) -> None:
        check(model, self.plan())

    def needs_data(self) -> bool:
        """Importance is measured unless the layers to drop are named and nothing else is asked."""
        o = self.options
        return not isinstance(o.drop_layers, list) or bool(o.mlp_keep or o.heads_keep)

    def run(
        self,
        model: torch.nn.Module,
        batches: list[torch.Tensor] | None,
        device: torch.device,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict:
        """Prune the model in place; the settings to report."""
        plan = self.plan()
        settings = {"method": self.name, **self.settings()}
        imp = Importance()
        if batches is not None:
            imp = measure_importance(model, batches, device, progress, plan)
            settings["layer_importance"] = "block influence 1 - cos(in, out): " + ", ".join(
                f"{v:.3f}" for v in imp.layers
            )
        settings.update(apply(model, plan, imp))
        return settings
