"""Which layers of a model a method may touch. Per-architecture knowledge lives here."""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, replace

import torch
from compressed_tensors.utils.match import is_match, match_named_modules

from compress.errors import UsageError
from compress.models.experts import Experts, router_linears
from compress.primitives.smoothing import fold

TARGETS = ["Linear"]


def max_positions(config) -> int | None:
    """Tokens the model can attend over (its position embeddings), from a config object or config.json's
    dict (a multimodal config's `text_config`); None when it states none."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    cfg = cfg.get("text_config") or cfg
    limit = cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("max_sequence_length")
    return int(limit) if isinstance(limit, int) and limit > 0 else None


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


def quant_targets(
    model: torch.nn.Module, extra_ignore: list[str], routers: list[str] = ()
) -> tuple[dict[str, torch.nn.Linear], list[str]]:
    """Linear layers to quantize (compressed-tensors' own matching) and the ignore list used: the output layer and a
    mixture of experts' routers stay in full precision."""
    check_supported(model)
    routers = list(dict.fromkeys([*routers, *router_linears(model)]))
    ignore = output_layer_names(model) + routers + list(extra_ignore)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for pattern in extra_ignore:
        if not any(is_match(n, m, pattern) for n, m in linears):
            raise UsageError(f"--ignore {pattern!r} matches no linear layer (names look like {linears[0][0]!r})")
    targets = dict(match_named_modules(model, TARGETS, ignore))
    if not targets:
        raise UsageError(f"{type(model).__name__}: no linear layers left to quantize")
    return targets, ignore


def unreached_weights(model: torch.nn.Module) -> tuple[float, list[str]]:
    """The share of the decoder layers' weight elements held outside nn.Linear layers (a mixture of experts'
    fused 3-D expert tensors), which no linear-layer method reaches, and those tensors' names within a layer."""
    total, outside, names = 0, 0, set()
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    try:
        layers = decoder_layers(model)
    except UsageError:  # a layout we do not know: nothing to say (data-free methods still run on its linears)
        return 0.0, []
    for layer in layers:
        for name, p in layer.named_parameters():
            if p.dim() < 2:
                continue  # norms and biases
            total += p.numel()
            if id(p) not in linear_weights:
                outside += p.numel()
                names.add(name)
    return (outside / total if total else 0.0), sorted(names)


def unreached_note(model: torch.nn.Module) -> str | None:
    """A warning when over 1% of the decoder layers' weights are outside linear layers (experts in a layout
    `experts.unfuse` does not know), which no method reaches."""
    share, outside = unreached_weights(model)
    if share <= 0.01:
        return None
    return (
        f"{share:.0%} of the decoder layers' weights are not linear layers and stay as they are "
        f"({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}; experts in this layout are not supported yet)"
    )


@dataclass(frozen=True)
class Smooth:
    """`prev`'s output feeds every linear in `linears` (names relative to a decoder layer), so
    a per-channel scale can move from those linears' inputs into `prev`'s output exactly."""

    prev: str
    linears: tuple[str, ...]
    values: bool = False  # prev is attention's value projection, the linears read the attention heads' outputs
    # set by `smooth_maps` under grouped-query attention: (kv heads, query heads per kv head, head dim); each value
    # channel then feeds one input channel of every query head of its group
    repeat: tuple[int, int, int] | None = None
    offset: float = 0.0  # prev is a norm scaling by (offset + weight): Gemma's 1 + weight

    def tie(self, t: torch.Tensor, reduce: str) -> torch.Tensor:
        """[I] per-channel statistics of the linears' inputs -> [I] with the channels one prev channel feeds set to
        their `reduce` ("mean" or "amax"), so a scale made of them folds into prev exactly."""
        if self.repeat is None:
            return t
        kv, rep, dim = self.repeat
        g = t.reshape(kv, rep, dim)
        g = g.amax(1, keepdim=True) if reduce == "amax" else g.mean(1, keepdim=True)
        return g.expand(kv, rep, dim).reshape(-1)

    def prev_scale(self, s: torch.Tensor) -> torch.Tensor:
        """A tied scale [I] of the linears' inputs -> [prev's outputs]."""
        if self.repeat is None:
            return s
        kv, rep, dim = self.repeat
        g = s.reshape(kv, rep, dim)
        if not torch.equal(g, g[:, :1].expand_as(g)):
            raise ValueError(f"{self.prev} -> {self.linears}: the scale differs within a group of query heads")
        return g[:, 0].reshape(-1)


_LLAMA = (
    Smooth("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Smooth("self_attn.v_proj", ("self_attn.o_proj",), values=True),  # grouped-query attention: scales tied per group
    Smooth("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Smooth("mlp.up_proj", ("mlp.down_proj",)),
)
# A mixture of experts' MLP input also feeds its router, which a fold would have to rescale: only attention, each
# expert's up -> down (`_expert_maps`) and the dense or shared MLPs are smoothed.
_SHARED = (Smooth("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",)),)
SMOOTH_MAPS: dict[str, tuple[Smooth, ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "mixtral": _LLAMA[:2],
    "qwen3_moe": _LLAMA[:2],
    "qwen2_moe": _LLAMA[:2] + _SHARED,
    "deepseek_v3": (  # latent attention (no map); its first layers dense
        *_LLAMA[2:],
        Smooth("mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",)),
    ),
    "opt": (
        Smooth("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Smooth("self_attn.v_proj", ("self_attn.out_proj",), values=True),
        Smooth("final_layer_norm", ("fc1",)),
        Smooth("fc1", ("fc2",)),  # through ReLU, which commutes with positive scales
    ),
    "phi3": (
        Smooth("input_layernorm", ("self_attn.qkv_proj",)),
        Smooth("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ),
    # Fused q/k/v; their MLPs pass through GELU, which does not commute with a scale (no h_to_4h -> 4h_to_h).
    "gpt_neox": (
        Smooth("input_layernorm", ("attention.query_key_value",)),
        Smooth("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ),
    "bloom": (
        Smooth("input_layernorm", ("self_attention.query_key_value",)),
        Smooth("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ),
}


def _falcon_maps(config) -> tuple[Smooth, ...]:
    """Falcon's norms depend on its config: one norm before parallel attention and MLP (7B), one per branch
    (`ln_attn`, `ln_mlp`: the new decoder architecture of 40B+), or a norm before each in sequence."""
    qkv, mlp = "self_attention.query_key_value", "mlp.dense_h_to_4h"
    if getattr(config, "new_decoder_architecture", False) and getattr(config, "num_ln_in_parallel_attn", 2) == 2:
        return (Smooth("ln_attn", (qkv,)), Smooth("ln_mlp", (mlp,)))
    if getattr(config, "new_decoder_architecture", False) or getattr(config, "parallel_attn", True):
        return (Smooth("input_layernorm", (qkv, mlp)),)
    return (Smooth("input_layernorm", (qkv,)), Smooth("post_attention_layernorm", (mlp,)))


def smooth_maps(model: torch.nn.Module, layer: torch.nn.Module) -> list[Smooth]:
    """The mappings of this architecture whose shapes fit. Under grouped-query attention, v_proj -> o_proj carries
    `repeat`: a value channel feeds that channel of every query head of its group, so their scales are tied. An
    architecture without an adapter gets the maps proven exact on its own layers (`proven_maps`)."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    if kind == "falcon":
        return _fitting(model, layer, (*_falcon_maps(model.config), *_expert_maps(layer)))
    if kind in SMOOTH_MAPS:
        return _fitting(model, layer, (*SMOOTH_MAPS[kind], *_expert_maps(layer)))
    return proven_maps(model, layer)


def _fitting(model: torch.nn.Module, layer: torch.nn.Module, candidates) -> list[Smooth]:
    maps = []
    names = {n for n, _ in layer.named_modules()}
    for m in candidates:
        if m.prev not in names or not all(n in names for n in m.linears):
            continue  # a dense layer's map in a mixture-of-experts layer, or the other way round
        prev = layer.get_submodule(m.prev)
        width = prev.out_features if isinstance(prev, torch.nn.Linear) else prev.weight.shape[0]
        if all(layer.get_submodule(n).in_features == width for n in m.linears):
            maps.append(m)
        elif m.values and (repeat := _value_groups(model.config, width)):
            if all(layer.get_submodule(n).in_features == width * repeat[1] for n in m.linears):
                maps.append(replace(m, repeat=repeat))
    return maps


# An architecture without an adapter: candidate maps are read off one forward of the layer (a norm whose output
# tensor is the very input of linears) and its names (a value -> output and an up -> down projection pair), and each
# is kept only if folding random scales into it leaves the layer's outputs unchanged. Tolerance: an exact fold moves
# float32 outputs by ~1e-6 of their largest; a wrong one (a norm scaling by 1 + weight, an activation that does not
# commute with scales, a router reading the norm too) by far more than 1e-4.
PROOF_TOLERANCE = 1e-4
PROOF_TOKENS = 32  # per sequence, 2 sequences: every expert of a small mixture gets tokens
_PAIRS = (("v_proj", "o_proj", True), ("up_proj", "down_proj", False), ("fc1", "fc2", False))
_PROVEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {layer layout: its proven maps}


def proven_maps(model: torch.nn.Module, layer: torch.nn.Module) -> list[Smooth]:
    """The smoothing maps that hold exactly in this layer, proven once per layer layout of the model."""
    by_layout = _PROVEN.setdefault(model, {})
    layout = tuple(
        (n, type(m).__name__, *(tuple(p.shape) for p in m.parameters(recurse=False))) for n, m in layer.named_modules()
    )
    if layout not in by_layout:
        by_layout[layout] = _prove(model, layer)
    if not any(by_layout.values()):
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise UsageError(
            f"{kind}: no norm -> projection scale folds exactly in its layers (each candidate tried on the layer "
            "itself), so AWQ and SmoothQuant have nothing to smooth; use --method gptq or rtn"
        )
    return by_layout[layout]


class _Captured(Exception):
    pass


def _cpu_float(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float() if value.is_floating_point() else value.detach().cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_cpu_float(v) for v in value)
    return value


def _probe_inputs(model: torch.nn.Module) -> tuple[torch.Tensor, dict]:
    """The first decoder layer's input and keyword arguments (masks, rotary tables) on a few random tokens, float32
    on the CPU."""
    box: dict = {}

    def hook(module, args, kwargs):
        box["hidden"] = args[0] if args else kwargs["hidden_states"]
        skip = ("hidden_states", "past_key_values", "past_key_value", "use_cache")
        box["kwargs"] = {k: v for k, v in kwargs.items() if k not in skip}
        raise _Captured

    embed = model.get_input_embeddings()
    vocab = embed.weight.shape[0]
    ids = torch.randint(0, vocab, (2, PROOF_TOKENS), generator=torch.Generator().manual_seed(0))
    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(ids.to(embed.weight.device), use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return _cpu_float(box["hidden"]), _cpu_float(box["kwargs"])


def _is_norm(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (
        not isinstance(module, torch.nn.Linear)
        and not any(True for _ in module.children())
        and isinstance(w, torch.nn.Parameter)
        and w.dim() == 1
    )


@torch.no_grad()
def _prove(model: torch.nn.Module, layer: torch.nn.Module) -> list[Smooth]:
    hidden, kwargs = _probe_inputs(model)
    block = copy.deepcopy(layer).float().cpu().eval()
    for m in block.modules():  # the engine's hooks, copied along
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()

    def run() -> torch.Tensor:
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    inputs, outputs = {}, {}
    hooks = []
    for n, m in block.named_modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, a[0])))
        elif _is_norm(m):
            hooks.append(m.register_forward_hook(lambda mod, a, out, n=n: outputs.setdefault(n, out)))
    try:
        ref = run()
    finally:
        for h in hooks:
            h.remove()
    fed = {norm: tuple(lin for lin, x in inputs.items() if x is out) for norm, out in outputs.items()}
    join = lambda parent, child: f"{parent}.{child}" if parent else child  # noqa: E731
    candidates = [Smooth(norm, lins) for norm, lins in fed.items() if lins]
    for parent, m in block.named_modules():
        children = {n for n, _ in m.named_children()}
        candidates += [
            Smooth(join(parent, a), (join(parent, b),), values=values)
            for a, b, values in _PAIRS
            if a in children and b in children
        ]
    proven = []
    gen = torch.Generator().manual_seed(0)
    for m in _fitting(model, block, candidates):
        if not all(n in inputs for n in (*m.linears, m.prev) if isinstance(block.get_submodule(n), torch.nn.Linear)):
            continue  # an expert no probe token reached: nothing shows the fold holds
        prev, lins = block.get_submodule(m.prev), [block.get_submodule(n) for n in m.linears]
        width = prev.out_features if isinstance(prev, torch.nn.Linear) else prev.weight.shape[0]
        s_prev = torch.rand(width, generator=gen) * 1.5 + 0.5
        s = s_prev if m.repeat is None else s_prev.reshape(m.repeat[0], 1, -1).expand(*m.repeat).reshape(-1)
        for offset in (0.0,) if isinstance(prev, torch.nn.Linear) else (0.0, 1.0):
            fold(prev, lins, s, prev_s=s_prev, offset=offset)
            err = float((run() - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
            fold(prev, lins, 1 / s, prev_s=1 / s_prev, offset=offset)  # back
            if err < PROOF_TOLERANCE:
                proven.append(replace(m, offset=offset))
                break
    return proven


def _value_groups(config, width: int) -> tuple[int, int, int] | None:
    """(kv heads, query heads per kv head, head dim) of grouped-query attention whose value projection is `width`
    wide; None when the config says otherwise."""
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if not heads or not kv or heads % kv or width % kv:
        return None
    return kv, heads // kv, width // kv


def _expert_maps(layer: torch.nn.Module) -> list[Smooth]:
    """Each expert's up -> down (per-expert linears, `experts.unfuse`)."""
    return [
        Smooth(f"{name}.{e}.{ex.names.up}", (f"{name}.{e}.{ex.names.down}",))
        for name, m in layer.named_modules()
        if isinstance(m, Experts)
        for e, ex in enumerate(m)
    ]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated blocks of a transformers model (decoder layers, or encoder layers)."""
    for path in (
        "model.layers",
        "model.decoder.layers",
        "transformer.h",
        "gpt_neox.layers",
        "encoder.layer",
        "bert.encoder.layer",
    ):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return node
    raise UsageError(f"{type(model).__name__}: no decoder layers found for layer-by-layer calibration")


def decoder_prefix(model: torch.nn.Module) -> str:
    """The module name of the repeated blocks (`model.layers`), as linears' full names start."""
    blocks = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is blocks)
