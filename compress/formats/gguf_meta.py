"""Integer metadata of a GGUF file's architecture (`{arch}.block_count`, `{arch}.context_length`, ...)."""

from __future__ import annotations


def arch_int(reader, key: str) -> int | None:
    """`{general.architecture}.{key}` of an open `gguf.GGUFReader`; None when absent."""
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    field = reader.fields.get(f"{arch}.{key}")
    return int(field.parts[field.data[0]][0]) if field else None
