"""Write quantized weights in the compressed-tensors format (config.json `quantization_config`).

int4 weights are packed 8 to an int32 ("pack-quantized"), int8 stored as int8
("int-quantized"), float8 as e4m3 ("float-quantized"); transformers and vLLM read them
without our code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.base import compress_module
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from safetensors import safe_open

from compress.errors import UsageError
from compress.formats import stored
from compress.models.arch import TARGETS
from compress.primitives.qparams import Grid, GridParams, QuantizedWeight, activation_grid, dequantize


def ct_scheme(grid: Grid, act: str | None, targets: list[str]) -> QuantizationScheme:
    """compressed-tensors' description of a weight grid and of dynamic per-token activations
    (act: None or one of qparams.ACTIVATIONS)."""
    weights = QuantizationArgs(
        num_bits=grid.bits,
        type=grid.kind,
        symmetric=grid.symmetric,
        strategy="channel" if grid.group_size is None else "group",
        group_size=grid.group_size,
    )
    acts = None
    if act:
        g = activation_grid(act)
        acts = QuantizationArgs(num_bits=8, type=g.kind, strategy="token", symmetric=g.symmetric, dynamic=True)
    return QuantizationScheme(targets=targets, weights=weights, input_activations=acts)


def config_for(
    grid: Grid, act: str | None, ignore: list[str], per_linear: dict[str, Grid] | None = None
) -> QuantizationConfig:
    """One scheme for every linear, or (mixed precision) one config group per grid that names its linears."""
    if per_linear:
        by_grid: dict[Grid, list[str]] = {}
        for name, g in sorted(per_linear.items()):
            by_grid.setdefault(g, []).append(name)
        ordered = sorted(by_grid.items(), key=lambda kv: kv[0].bits)
        groups = {f"group_{i}": ct_scheme(g, act, names) for i, (g, names) in enumerate(ordered)}
    else:
        groups = {"group_0": ct_scheme(grid, act, TARGETS)}
    return QuantizationConfig(
        config_groups=groups,
        ignore=ignore,
        quantization_status=QuantizationStatus.FROZEN,
    )


@torch.no_grad()
def compress_linears(model: torch.nn.Module, config: QuantizationConfig, weights: dict[str, QuantizedWeight]) -> None:
    """Replace these linears' weights by our integers and scales in compressed form, as soon
    as they are final (a decoder layer at a time), so dense copies do not pile up."""
    modules = {n: model.get_submodule(n) for n in weights}
    apply_quantization_config(model, config, show_progress=False, allowed_modules=list(modules.values()))
    for name, module in modules.items():
        qw = weights[name]
        if getattr(module, "quantization_scheme", None) is None:
            raise RuntimeError(f"compressed-tensors does not target {name}, which we quantized")
        module.weight_scale.data = qw.scale.to(module.weight_scale.device)
        module.weight_zero_point.data = qw.zero_point.to(module.weight_zero_point.device)
        # fp32 weights that sit exactly on the grid: the compressor's own rounding
        # (w / scale) then recovers our integers exactly, whatever the model's dtype.
        exact = dequantize(qw.q, qw.scale.float(), qw.zero_point).to(module.weight.device)
        module.weight = torch.nn.Parameter(exact, requires_grad=False)
        compress_module(module)


def finish(model: torch.nn.Module, quantized: set[str]) -> ModelCompressor:
    """Check every quantized linear went through `compress_linears`; the compressor that writes
    the config."""
    found = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    if found != quantized:
        raise RuntimeError(f"compressed-tensors holds {len(found)} quantized layers, we quantized {len(quantized)}")
    compressor = ModelCompressor.from_pretrained_model(model)
    # compressed-tensors writes the ignore list in checkpoint names (GPT-NeoX's `lm_head` is `embed_out` on disk),
    # but transformers matches it against the loaded model's names: with only `embed_out` listed, it quantized
    # lm_head on reload (a shape error for w8a16, NaN logits for fp8). Both names, so either reader finds its own.
    qc = compressor.quantization_config
    dense = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in found]
    qc.ignore = list(qc.ignore or []) + [n for n in dense if n not in (qc.ignore or [])]
    compressor.compress_model(model, skip_compressed=True)
    return compressor


def write_config(compressor: ModelCompressor, dest: Path, model: torch.nn.Module) -> None:
    """Add the quantization_config to dest/config.json. Packed checkpoints that transformers cannot build in packed
    form also get `dequantize: true`, so that it de-quantizes each layer while loading (compressed-tensors' own
    decompress) instead. Met on transformers 5.24 with compressed-tensors 0.20.1 (and 0.19): zero points, which
    compressed-tensors lays out unpacked ([O, G]) in an empty model, so the stored packed [O*bits/32, G] int32 ones
    are refused as a size mismatch; and architectures whose weight init reads `.weight` of every layer of their own
    Linear subclass (Falcon's FalconLinear: "has no attribute 'weight'"). Not set otherwise: that path multiplies
    integers by the stored bf16 scales in bf16 even for a float32 load, while the packed path is exact in float32.
    vLLM ignores the key and reads the packed tensors as the format defines them."""
    compressor.update_config(str(dest))
    path = Path(dest) / "config.json"
    config = json.loads(path.read_text())
    qc = config.get("quantization_config") or {}
    asymmetric = any(not (g.get("weights") or {}).get("symmetric", True) for g in qc.get("config_groups", {}).values())
    subclassed = any(
        isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear and hasattr(m, "quantization_scheme")
        for m in model.modules()
    )
    if qc.get("format") == "pack-quantized" and (asymmetric or subclassed):
        qc["dequantize"] = True
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_grids(ckpt: Path) -> tuple[QuantizationConfig, dict[str, GridParams]]:
    """A compressed-tensors checkpoint written by us: its quantization config and, per
    quantized linear, the grid with its stored scales and zero points (zeros if symmetric)."""

    ckpt = Path(ckpt)
    qc = json.loads((ckpt / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        hint = (
            "; nf4 checkpoints are for bitsandbytes (QLoRA): use w4a16 here"
            if qc.get("quant_method") == "bitsandbytes"
            else ""
        )
        raise UsageError(f"{ckpt}: not a compressed-tensors checkpoint (quant_method {qc.get('quant_method')!r}){hint}")
    config = QuantizationConfig.model_validate(qc)
    config.quantization_status = QuantizationStatus.FROZEN  # as `config_for`: compressed again when saved
    groups = {k: g.model_dump(mode="json") for k, g in config.config_groups.items()}
    for args in (g.weights for g in config.config_groups.values()):
        if args is None or args.strategy not in ("group", "channel") or args.dynamic:
            raise UsageError(
                f"{ckpt}: weight quantization {args and args.strategy!r} is not one compress can train through"
            )
    grids: dict[str, GridParams] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            keys = set(st.keys())
            for key in st.keys():
                if not key.endswith(".weight_scale"):
                    continue
                name = key[: -len(".weight_scale")]
                grid = stored.grid_of(groups, name)  # every group's strategy was checked above
                if grid is None:
                    raise UsageError(f"{ckpt}: {name} is stored quantized but no config group targets it")
                scale = st.get_tensor(key)
                grids[name] = GridParams(grid, scale, stored.zero_point(st, keys, name, scale.shape, grid.bits))
    if not grids:
        raise UsageError(f"{ckpt}: no quantized weights (weight_scale) found")
    return config, grids
