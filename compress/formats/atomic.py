"""Output appears whole or not at all: write beside OUT, rename into place."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.errors import CompressError, UsageError

MB = 2**20


def read_paths(inputs: list[Path]) -> list[Path]:
    """Every path the inputs read, resolved through symbolic links: each input itself and, for a
    directory, every file and folder below it (a Hugging Face cache snapshot links its weights
    into a blobs/ folder elsewhere)."""
    out = []
    for src in inputs:
        out.append(src.resolve())
        if src.is_dir():
            out += [p.resolve() for p in src.rglob("*")]
    return out


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_not_input(targets: list[tuple[Path, str]], inputs: list[Path]) -> None:
    """Refuse paths to be written or deleted (each with what it is, for the message) that equal,
    contain or sit inside anything the inputs read. The inputs are walked once."""
    read = read_paths(inputs)
    for path, what in targets:
        target = path.resolve()
        hit = next((r for r in read if _overlaps(target, r)), None)
        if hit is not None:
            raise UsageError(f"{what} {path} overlaps {hit}, which the input reads; choose another path")


def check_output(dest: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse an existing OUT (unless overwrite) or an OUT, staging or temporary directory that
    would touch anything an input reads."""
    check_not_input([(dest, "output"), (staging_dir(dest), "the staging directory")], inputs)
    if dest.is_symlink():
        raise UsageError(f"output {dest} is a symbolic link; give the real directory")
    if dest.exists() and not overwrite:
        raise UsageError(f"output {dest} already exists; pass --overwrite to replace it")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"output {dest} exists and is not a directory")
    parent = dest.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise UsageError(f"output {dest} is not writable (no write permission in {probe})")


def _umasked(mode: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


_DIR_MODE = _umasked(0o777)


def private_dir(dest: Path) -> Path:
    """A fresh directory beside `dest` that no other process writes (two runs filling the same
    cache entry at once each build their own, then `publish` one)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, _DIR_MODE)  # becomes a shared cache entry
    return tmp


def publish(tmp: Path, dest: Path) -> Path:
    """Rename a finished `private_dir` to a cache entry; when another process got there first,
    keep its entry (same content) and drop ours."""
    try:
        tmp.rename(dest)
    except OSError:
        if not (dest / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def staging_dir(dest: Path) -> Path:
    """Where a resumable job (one that trains) builds OUT: a fixed name, so a rerun finds it."""
    return dest.parent / f".{dest.name}.partial"


def resumable(path: Path) -> bool:
    """Holds a finished stage or a training checkpoint of an interrupted run."""
    return any((path / "checkpoints").glob("step-*/state.json")) or any((path / "stages").glob("*/stage.json"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _no_space(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


def _space_message(dest: Path, needed: int | None) -> str:
    free = shutil.disk_usage(dest.parent).free if dest.parent.exists() else 0
    need = f"needed about {needed / MB:,.0f} MiB, " if needed else ""
    return f"no space left on the device of {dest.parent} ({need}free {free / MB:,.0f} MiB); nothing was written"


@contextmanager
def output_lock(dest: Path) -> Iterator[None]:
    """One run at a time writes `dest`: a second one is refused, naming the first."""
    path = dest.parent / f".{dest.name}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CompressError(f"cannot create the output beside {dest}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UsageError(
                f"another compress run (pid {other}) is writing {dest}; wait for it to finish or choose another output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def clean_stale(dest: Path) -> list[str]:
    """Remove the temporary directories that killed runs left beside `dest` (their process is
    gone); say which."""
    said = []
    for old in dest.parent.glob(f".{dest.name}.partial-*"):
        pid = old.name[len(f".{dest.name}.partial-") :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
            said.append(f"removed {old}, left by an interrupted run (pid {pid})")
    return said


@contextmanager
def atomic_dir(
    dest: Path, overwrite: bool, stable: bool = False, resume: bool = False, needed: int | None = None
) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; on success it becomes `dest`. One run at a
    time holds `dest` (`output_lock`); temporary directories of killed runs are removed first.

    stable: the directory is `staging_dir(dest)` and outlives a failure or Ctrl-C when it
    holds training checkpoints, so that `resume` can continue from them. needed: the bytes the
    output is expected to take, for the message when the disk fills up."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompressError(f"cannot create the output beside {dest}: {exc.strerror}") from None
    with output_lock(dest):
        for line in clean_stale(dest):
            warnings.warn(line, stacklevel=3)
        with _staged(dest, overwrite, stable, resume, needed) as tmp:
            yield tmp


@contextmanager
def _staged(dest: Path, overwrite: bool, stable: bool, resume: bool, needed: int | None) -> Iterator[Path]:
    try:
        if stable:
            tmp = staging_dir(dest)
            if tmp.exists() and not resume:
                if resumable(tmp) and not overwrite:
                    raise UsageError(
                        f"{tmp} holds the finished stages or checkpoints of an interrupted run: pass --resume to "
                        f"continue it, or --overwrite to start over"
                    )
                warnings.warn(f"removing {tmp}, left by an interrupted run", stacklevel=4)
                shutil.rmtree(tmp)
            tmp.mkdir(exist_ok=True)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{os.getpid()}-", dir=dest.parent))
            os.chmod(tmp, _DIR_MODE)  # becomes OUT: the permissions of a directory made with mkdir
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
    except BaseException as exc:
        if not (stable and resumable(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(exc):
            raise CompressError(_space_message(dest, needed)) from None
        if isinstance(exc, OSError) and not isinstance(exc, CompressError):
            raise CompressError(f"cannot write {dest}: {exc.strerror or exc}") from None
        raise
