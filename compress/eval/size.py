"""Bytes on disk and bits per weight, read from safetensors headers (no tensors loaded)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

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
    out: dict[str, dict] = {}
    for f in weight_files(path):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            out.update({k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"})
    return out


def _bytes(entry: dict) -> int:
    start, end = entry["data_offsets"]
    return end - start


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def packed_bits(path: Path) -> int:
    """Bits per value in compressed-tensors' packed int32 words (from config.json)."""
    config = json.loads((path / "config.json").read_text())
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    return next((g["weights"]["num_bits"] for g in groups.values() if g.get("weights")), 4)


def bits_per_weight(path: Path, layers: list[str]) -> float | None:
    """Stored bits per original weight over these layers: weights plus scales and zero points."""
    head = headers(path)
    per_word = 32 // packed_bits(path)
    stored, count = 0, 0
    for layer in layers:
        parts = {k[len(layer) + 1 :]: v for k, v in head.items() if k.startswith(layer + ".")}
        if "weight" in parts:
            numel = _numel(parts["weight"]["shape"])
        elif "weight_packed" in parts:
            rows, cols = parts["weight_packed"]["shape"]
            numel = rows * cols * per_word
        elif "weight_bitmask" in parts:  # sparse storage: one bit per weight (widths are multiples of 8)
            rows, cols = parts["weight_bitmask"]["shape"]
            numel = rows * cols * 8
        else:
            continue
        stored += sum(_bytes(v) for k, v in parts.items() if k.startswith("weight") and k != "weight_shape") * 8
        count += numel
    return stored / count if count else None
