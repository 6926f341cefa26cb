"""The C heap (glibc malloc) behind PyTorch's CPU tensors.

Freed tensor memory stays in malloc's arenas, so resident memory only ever grows while
layers are processed one by one. `trim` hands free pages back to the OS after each layer;
`single_arena` stops worker threads from opening arenas of their own. No-ops where the C
library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def trim() -> None:
    if libc := _libc():
        libc.malloc_trim(0)


def single_arena() -> None:
    """Called once by the command line (a library caller keeps its own malloc settings)."""
    if libc := _libc():
        libc.mallopt(M_ARENA_MAX, 1)


MADV_DONTNEED = 4
PAGE = 4096


def _file_mappings(suffix: str) -> list[tuple[int, int]]:
    """[start, end) of this process's private mappings of files named *suffix."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[-1].endswith(suffix) and parts[1][3] == "p":
                start, end = (int(v, 16) for v in parts[0].split("-"))
                out.append((start, end))
    return out


def own_weights(tensors: list) -> None:
    """Give memory-mapped checkpoint tensors (what safetensors loads) memory of their own,
    one at a time, and let the kernel drop each copied file page at once.

    Mapped pages stay resident after a layer's weights are replaced (by compressed ones),
    so resident memory would keep the whole original model; copies are freed like any
    tensor. Only pages inside a private mapping of a .safetensors file, never written
    (just loaded), are dropped; a later read of them would re-read the file."""
    libc = _libc()
    try:
        maps = _file_mappings(".safetensors") if libc else []
    except OSError:
        maps = []
    if not maps:
        return
    seen: set[int] = set()
    for t in tensors:
        storage = t.untyped_storage()
        ptr, n = storage.data_ptr(), storage.nbytes()
        if t.device.type != "cpu" or ptr in seen or not any(s <= ptr < e for s, e in maps):
            continue
        seen.add(ptr)
        old = t.data
        t.data = old.clone()
        lo, hi = -(-ptr // PAGE) * PAGE, (ptr + n) // PAGE * PAGE  # whole pages inside the tensor
        if hi > lo and any(s <= lo and hi <= e for s, e in maps):
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)
        del old, storage
