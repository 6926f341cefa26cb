"""Output appears whole or not at all: write beside OUT, rename into place."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.errors import CompressError, UsageError


def check_output(dest: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse an existing OUT (unless overwrite) or an OUT that would touch an input."""
    dest_r = dest.resolve()
    for src in inputs:
        src_r = src.resolve()
        if dest_r == src_r or src_r in dest_r.parents or dest_r in src_r.parents:
            raise UsageError(f"output {dest} overlaps the input {src}; choose another directory")
    if dest.exists() and not overwrite:
        raise UsageError(f"output {dest} already exists; pass --overwrite to replace it")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"output {dest} exists and is not a directory")
    parent = dest_r.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise UsageError(f"output {dest} is not writable (no write permission in {probe})")


def staging_dir(dest: Path) -> Path:
    """Where a resumable job (one that trains) builds OUT: a fixed name, so a rerun finds it."""
    return dest.parent / f".{dest.name}.partial"


def resumable(path: Path) -> bool:
    """Holds a finished stage or a training checkpoint of an interrupted run."""
    return any((path / "checkpoints").glob("step-*/state.json")) or any((path / "stages").glob("*/stage.json"))


@contextmanager
def atomic_dir(dest: Path, overwrite: bool, stable: bool = False, resume: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; on success it becomes `dest`.

    stable: the directory is `staging_dir(dest)` and outlives a failure or Ctrl-C when it
    holds training checkpoints, so that `resume` can continue from them."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if stable:
            tmp = staging_dir(dest)
            if tmp.exists() and not resume:
                if resumable(tmp) and not overwrite:
                    raise UsageError(
                        f"{tmp} holds the finished stages or checkpoints of an interrupted run: pass --resume to "
                        f"continue it, or --overwrite to start over"
                    )
                shutil.rmtree(tmp)
            tmp.mkdir(exist_ok=True)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as exc:
        raise CompressError(f"cannot create the output beside {dest}: {exc.strerror}") from None
    try:
        yield tmp
        if dest.exists():
            if not overwrite:
                raise UsageError(f"output {dest} appeared while working; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / "x")
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except OSError as exc:
        if not (stable and resumable(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise CompressError(f"no space left on the device while writing {dest}; nothing was written") from None
        raise CompressError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except BaseException:
        if not (stable and resumable(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
