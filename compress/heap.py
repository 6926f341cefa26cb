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
