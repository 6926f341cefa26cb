"""Bytes on disk and bits per weight, read from safetensors headers (no tensors loaded)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from compress.formats import bnb_nf4

DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "BOOL": 8,
}


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def bytes_on_disk(path: Path) -> int:
    """Size of the weight files: what a deployment downloads and loads."""
    return sum(f.stat().st_size for f in weight_files(path))


def headers(path: Path) -> dict[str, dict]:
    """Tensor name -> its header entry (dtype, shape, data_offsets), plus "file" and "data_start"
    (where its file's data begins) to read a small tensor's values with `read_ints`."""
    out: dict[str, dict] = {}
    for f in weight_files(path):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            entries = json.loads(fh.read(n))
        out.update({k: {**v, "file": f, "data_start": 8 + n} for k, v in entries.items() if k != "__metadata__"})
    return out


def read_ints(entry: dict) -> list[int]:
    """The values of a small I64/I32/U8 tensor from its header entry (compressed-tensors' weight_shape)."""
    fmt = {"I64": "q", "I32": "i", "U8": "B"}[entry["dtype"]]
    start, end = entry["data_offsets"]
    with Path(entry["file"]).open("rb") as fh:
        fh.seek(entry["data_start"] + start)
        data = fh.read(end - start)
    return list(struct.unpack(f"<{len(data) // struct.calcsize(fmt)}{fmt}", data))


def compressed_layers(path: Path) -> list[str]:
    """The linears stored compressed: quantized (compressed-tensors scales, bitsandbytes absmax) or sparse."""
    suffixes = (".weight_scale", ".weight_bitmask", f".{bnb_nf4.ABSMAX}")
    return sorted({k[: -len(s)] for k in headers(path) for s in suffixes if k.endswith(s)})


def _bytes(entry: dict) -> int:
    start, end = entry["data_offsets"]
    return end - start


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def bits_per_weight(path: Path, layers: list[str]) -> float | None:
    """Stored bits per original weight over these layers: weights plus scales and zero points."""
    head = headers(path)
    stored, count = 0, 0
    for layer in layers:
        parts = {k[len(layer) + 1 :]: v for k, v in head.items() if k.startswith(layer + ".")}
        if bnb_nf4.QUANT_STATE in parts:  # bitsandbytes: two codes a byte; the shape is in its JSON quant state
            numel = _numel(json.loads(bytes(read_ints(parts[bnb_nf4.QUANT_STATE])))["shape"])
        elif "weight" in parts:
            numel = _numel(parts["weight"]["shape"])
        elif "weight_packed" in parts:  # packed densely (3 bits: 32 values in 3 words), so the shape is stored
            numel = _numel(read_ints(parts["weight_shape"]))
        elif "weight_bitmask" in parts:  # sparse storage: one bit per weight (widths are multiples of 8)
            rows, cols = parts["weight_bitmask"]["shape"]
            numel = rows * cols * 8
        else:
            continue
        stored += sum(_bytes(v) for k, v in parts.items() if k.startswith("weight") and k != "weight_shape") * 8
        count += numel
    return stored / count if count else None
