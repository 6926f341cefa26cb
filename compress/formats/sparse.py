"""Sparse storage: a pruned weight as a bitmask of its non-zeros plus the kept values.

`weight` [O, I] becomes `weight_bitmask` (uint8 [O, ceil(I/8)], bit j%8 of byte j//8 set when
column j is non-zero) and `weight_shape`, plus the non-zeros in row-major order:
- bfloat16: split losslessly into `weight_signmant` (sign and 7 mantissa bits, one byte each)
  and 4-bit exponent codes `weight_expcodes` (two per byte) into a per-tensor table of the 15
  most common exponents `weight_exptable`; code 15 is an escape whose exponent follows, in
  order, in `weight_expescapes`. Kept weights are the larger ones, so their exponents span a
  narrow range (7 to 17 distinct values per SmolLM2 linear): 12 bits per kept value.
- other dtypes: `weight_values` as they are.
At 50% sparsity in bf16 that is 7 bits per weight instead of 16. Plain transformers cannot
read it; `densify` rebuilds the dense checkpoint bit for bit, and every compress command does
so on its own.

config.json carries `compress_sparsity` (also for dense storage): method, pattern, measured
sparsity and storage.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.formats.atomic import private_dir, publish

KEY = "compress_sparsity"
SUFFIXES = (
    "weight_bitmask",
    "weight_shape",
    "weight_values",
    "weight_signmant",
    "weight_expcodes",
    "weight_exptable",
    "weight_expescapes",
)


ESCAPE = 15


def pack(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [O, I] -> the stored parts, by suffix."""
    nz = w != 0
    out_f, in_f = w.shape
    pad = (-in_f) % 8
    bits = torch.nn.functional.pad(nz, (0, pad)).reshape(out_f, -1, 8).to(torch.uint8)  # [O, I/8, 8]
    parts = {
        "weight_bitmask": (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8),  # [O, ceil(I/8)]
        "weight_shape": torch.tensor([out_f, in_f]),
    }
    values = w[nz]
    if values.dtype != torch.bfloat16:
        return parts | {"weight_values": values.contiguous()}
    raw = values.view(torch.int16).to(torch.int32) & 0xFFFF  # [n] sign | exponent (8) | mantissa (7)
    exp = (raw >> 7) & 0xFF
    found, counts = exp.unique(return_counts=True)
    table = found[counts.argsort(descending=True, stable=True)[:ESCAPE]]
    lut = torch.full((256,), ESCAPE, dtype=torch.int32)
    lut[table] = torch.arange(len(table), dtype=torch.int32)
    codes = lut[exp]  # [n] 0..15
    pairs = torch.nn.functional.pad(codes, (0, len(codes) % 2)).reshape(-1, 2)
    return parts | {
        "weight_signmant": (((raw >> 8) & 0x80) | (raw & 0x7F)).to(torch.uint8),
        "weight_expcodes": (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8),
        "weight_exptable": table.to(torch.uint8),
        "weight_expescapes": exp[codes == ESCAPE].to(torch.uint8),
    }


def unpack(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    out_f, in_f = (int(v) for v in parts["weight_shape"])
    bits = (parts["weight_bitmask"].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [O, ceil(I/8), 8]
    nz = bits.reshape(out_f, -1)[:, :in_f].bool()
    if "weight_values" in parts:
        values = parts["weight_values"]
    else:
        sm = parts["weight_signmant"].to(torch.int32)
        packed = parts["weight_expcodes"].to(torch.int32)
        codes = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[: len(sm)]
        exp = torch.cat([parts["weight_exptable"].to(torch.int32), torch.zeros(1, dtype=torch.int32)])[codes]
        exp[codes == ESCAPE] = parts["weight_expescapes"].to(torch.int32)
        raw = ((sm & 0x80) << 8) | (exp << 7) | (sm & 0x7F)
        values = raw.to(torch.int16).view(torch.bfloat16)  # int32 -> int16 keeps the low 16 bits
    w = torch.zeros(out_f, in_f, dtype=values.dtype)
    w[nz] = values
    return w


def info(path: Path) -> dict | None:
    try:
        return json.loads((path / "config.json").read_text()).get(KEY)
    except (OSError, json.JSONDecodeError):
        return None


def is_sparse(path: Path) -> bool:
    return (info(path) or {}).get("storage") == "sparse"


def carried(sparsity: dict) -> dict:
    """What a checkpoint written from a sparse input records of its sparsity (not where a
    densified copy came from)."""
    return {k: v for k, v in sparsity.items() if k != "densified_from"}


def record(path: Path, sparsity: dict) -> None:
    """Add the sparsity block to a written checkpoint's config.json."""
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[KEY] = sparsity
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _rewrite(path: Path, convert) -> None:
    """Rewrite every safetensors shard of `path` in place through convert(dict) -> dict,
    and the shard index's weight map to match."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        tensors = convert(tensors)
        tmp = shard.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={**meta, "format": "pt"})
        tmp.replace(shard)
        if index:
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name} | {
                k: shard.name for k in tensors
            }
    if index:
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def compress_checkpoint(path: Path, linears: list[str]) -> None:
    """Store these linears' weights of a saved dense checkpoint as bitmask + values."""
    names = {f"{n}.weight" for n in linears}

    def convert(tensors: dict) -> dict:
        out = {}
        for k, t in tensors.items():
            if k in names:
                base = k[: -len("weight")]
                out.update({base + s: v for s, v in pack(t).items()})
            else:
                out[k] = t
        return out

    _rewrite(path, convert)


def densify(src: Path, dest: Path) -> Path:
    """Copy a sparse-storage checkpoint to `dest` with dense weights (bit-identical values)."""
    tmp = private_dir(dest)
    shutil.copytree(src, tmp, dirs_exist_ok=True)

    def convert(tensors: dict) -> dict:
        out = {k: t for k, t in tensors.items() if not k.endswith(SUFFIXES)}
        for k in tensors:
            if k.endswith(".weight_bitmask"):
                base = k[: -len("weight_bitmask")]
                out[base + "weight"] = unpack({s: tensors[base + s] for s in SUFFIXES if base + s in tensors})
        return out

    try:
        _rewrite(tmp, convert)
        record(tmp, {**info(tmp), "storage": "dense", "densified_from": str(src)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish(tmp, dest)
