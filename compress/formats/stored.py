"""The integers, scales and zero points a compress checkpoint stores, read straight from its
safetensors, so exporters carry them over exactly instead of quantizing again."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open

from compress.errors import UsageError
from compress.primitives.qparams import Grid


@dataclass(frozen=True)
class StoredLinear:
    """One quantized linear as stored: w_hat = (q - zero_point) * scale, per group of
    `group_size` input columns (None: one group per row)."""

    q: torch.Tensor  # [N, K] int8 (int grids) or float8_e4m3fn (fp8)
    scale: torch.Tensor  # [N, G] float32 (exact: stored bf16/fp16 widen losslessly)
    zero_point: torch.Tensor  # [N, G] int8, zeros when symmetric
    bits: int
    kind: str  # "int" or "float"
    symmetric: bool
    group_size: int | None

    def dequantized(self) -> torch.Tensor:
        """[N, K] float32, computed in float32 (the reference every export is checked against)."""
        n, k = self.q.shape
        g = self.scale.shape[1]
        qg = self.q.float().reshape(n, g, k // g) - self.zero_point.float().unsqueeze(-1)
        return (qg * self.scale.unsqueeze(-1)).reshape(n, k)


def zero_point(st, keys: set[str], name: str, scale_shape: torch.Size, bits: int) -> torch.Tensor:
    """[O, G] int8: one linear's stored zero points (zeros when it has none). pack-quantized grids
    store them packed along the output rows, int32 (compressed-tensors' layout, which vLLM reads)."""
    key = f"{name}.weight_zero_point"
    if key not in keys:
        return torch.zeros(scale_shape, dtype=torch.int8)
    zp = st.get_tensor(key)
    if zp.dtype == torch.int32 and zp.shape != scale_shape:
        zp = unpack_from_int32(zp, bits, scale_shape, packed_dim=0)
    return zp.to(torch.int8).reshape(scale_shape)


def quantization_config(ckpt: Path) -> dict | None:
    return json.loads((Path(ckpt) / "config.json").read_text()).get("quantization_config")


def activation_kind(quantization_config: dict | None) -> str | None:
    """'int8', 'fp8' or None: what the checkpoint does to its quantized linears' inputs
    (dynamic, per token)."""
    for group in (quantization_config or {}).get("config_groups", {}).values():
        a = group.get("input_activations")
        if a and a.get("strategy") == "token":
            if a.get("type") == "float":
                return "fp8"
            return "int8" if a.get("symmetric", True) else "int8-asym"
    return None


def group_of(groups: dict[str, dict], name: str) -> dict | None:
    """The config group (its dict) whose targets name this linear: by name, by "re:" pattern, else a group
    that targets a class ("Linear", as one-scheme checkpoints do)."""
    by_class = None
    for group in groups.values():
        for t in group.get("targets") or []:
            if t == name or (t.startswith("re:") and re.match(t[3:], name)):
                return group
            if by_class is None and "." not in t and t[:1].isupper():
                by_class = group
    return by_class


def grid_of(groups: dict[str, dict], name: str) -> Grid | None:
    """This linear's weight grid from its config group; None when no group targets it or its weights are not per
    group or per channel."""
    args = (group_of(groups, name) or {}).get("weights")
    if not args or args["strategy"] not in ("group", "channel"):
        return None
    group = args["group_size"] if args["strategy"] == "group" else None
    return Grid(args["num_bits"], args["type"], args["symmetric"], group)


def read(ckpt: Path, only: set[str] | None = None) -> dict[str, StoredLinear]:
    """Every quantized linear of a compressed-tensors checkpoint written by compress (those named in `only`, when
    given), by module name (e.g. "model.layers.0.self_attn.q_proj"), each on its config group's grid (mixed
    precision: several). Empty for a plain checkpoint."""
    qc = quantization_config(ckpt)
    if not qc:
        return {}
    groups = qc.get("config_groups") or {}
    if qc.get("quant_method") != "compressed-tensors" or not groups:
        raise UsageError(f"{ckpt}: only compressed-tensors checkpoints (as compress writes) can be exported")
    out: dict[str, StoredLinear] = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            keys = set(st.keys())
            for key in sorted(k for k in keys if k.endswith(".weight_scale")):
                name = key[: -len(".weight_scale")]
                if only is not None and name not in only:
                    continue
                grid = grid_of(groups, name)
                if grid is None:
                    what = ((group_of(groups, name) or {}).get("weights") or {}).get("strategy")
                    raise UsageError(f"{ckpt}: {name} has weight strategy {what!r}, which cannot be exported")
                scale = st.get_tensor(key).float()
                if f"{name}.weight_packed" in keys:
                    shape = torch.Size(st.get_tensor(f"{name}.weight_shape").tolist())
                    q = unpack_from_int32(st.get_tensor(f"{name}.weight_packed"), grid.bits, shape)
                else:
                    q = st.get_tensor(f"{name}.weight")
                zp = zero_point(st, keys, name, scale.shape, grid.bits)
                out[name] = StoredLinear(q, scale, zp, grid.bits, grid.kind, grid.symmetric, grid.group_size)
    return out
