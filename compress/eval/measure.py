"""Measure checkpoints through the worker process; compare an encoder's embeddings to its base."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import compress
from compress.data import text as textdata
from compress.data.text import Texts
from compress.errors import CompressError
from compress.eval import tasks
from compress.eval.embedding import cosine
from compress.models.source import cache_dir, fingerprint
from compress.recipe import EvalSpec
from compress.report.schema import Latency, Measurement, Similarity, Speed


def measure(
    path: Path,
    task: str,
    spec: EvalSpec,
    texts: Texts,
    layers: list[str],
    device: str = "cpu",
    trust_remote_code: bool = False,
    base_embeddings: Path | None = None,
    keep_embeddings: Path | None = None,
    timed_with: Path | None = None,
    compared_with: Path | None = None,
    reuse: bool = False,
) -> Measured:
    """One checkpoint's size, quality and memory, in a fresh process; with `timed_with` (the
    baseline) the latency rounds of both run interleaved there, and the ratio is `speed`; with
    `compared_with` (the baseline, decoders) the result's divergence from it is measured there.
    `reuse` (an untimed base): an earlier run's measurement of the same weights, text, settings
    and versions is read back instead of measured again."""
    alone = not spec.latency and not timed_with and not compared_with  # nothing measured against a baseline
    also = [textdata.load(name, "evaluation", spec.text_column) for name in spec.also] if task == "causal-lm" else []
    key = _key(path, task, spec, [texts, *also], layers, device) if reuse and alone else None
    if key and (hit := _cached(key, keep_embeddings)):
        return Measured(hit, None, None)
    with tempfile.TemporaryDirectory(prefix="compress-eval-") as tmp:
        req = {
            "path": str(path),
            "task": task,
            "eval": spec.model_dump(),
            "texts": texts.texts,
            "text_desc": texts.description,
            "also": [{"texts": t.texts, "desc": t.description} for t in also],
            "layers": layers,
            "device": device,
            "trust_remote_code": trust_remote_code,
            "embeddings_out": str(keep_embeddings or Path(tmp) / "emb.pt"),
            "timed_with": str(timed_with) if timed_with else None,
            "compared_with": str(compared_with) if compared_with and task == "causal-lm" else None,
        }
        req_file, out_file, log_file = Path(tmp) / "req.json", Path(tmp) / "out.json", Path(tmp) / "worker.log"
        req_file.write_text(json.dumps(req))
        code = run_worker(req_file, out_file, log_file, tasks.MODULES if spec.tasks else [])
        if code != 0:
            log = log_file.read_text(errors="replace") if log_file.exists() else ""
            lines = [ln for ln in log.strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit {code}"
            if last.startswith("compress.errors."):  # our own error, worded for the user: its message alone
                raise CompressError(last.partition(": ")[2])
            raise CompressError(f"measuring {path} failed: {last}")
        got = json.loads(out_file.read_text())
        result = Measurement.model_validate(got["measurement"])
        if task != "causal-lm" and base_embeddings is not None:
            mine = torch.load(req["embeddings_out"])
            mean, worst = cosine(torch.load(base_embeddings), mine)
            result.similarity = Similarity(mean=mean, min=worst, texts=len(mine), text=texts.description)
        base_latency = got["base_latency"] and Latency.model_validate(got["base_latency"])
        if key:
            _store(key, result, Path(req["embeddings_out"]) if task != "causal-lm" else None)
        return Measured(result, base_latency, got["speed"] and Speed.model_validate(got["speed"]))


def run_worker(req_file: Path, out_file: Path, log_file: Path, preload: Sequence[str] = ()) -> int:
    """The worker in a new process, forked by this process's `server` (see there why) once it has
    imported `preload`; its exit code, its output in `log_file`."""
    with _lock:
        server = _server()
        msg = {
            "args": [str(req_file), str(out_file), str(log_file)],
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "preload": list(preload),
        }
        pid = None
        try:
            server.stdin.write(json.dumps(msg) + "\n")
            server.stdin.flush()
            pid = json.loads(server.stdout.readline())["pid"]
            return json.loads(server.stdout.readline())["code"]
        except (OSError, ValueError, KeyError):  # the server died: the next measurement starts another
            _stop(server)
            return 1
        except BaseException:  # interrupted here: the measurement stops with us
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
            _stop(server)
            raise


_lock = threading.Lock()
_servers: list[subprocess.Popen] = []


def _server() -> subprocess.Popen:
    if not _servers or _servers[0].poll() is not None:
        _servers[:] = [
            subprocess.Popen(
                [sys.executable, "-m", "compress.eval.server"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        ]
    return _servers[0]


@atexit.register
def _stop_all() -> None:
    for server in _servers:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        server.stdin.close()  # the server leaves at the end of its input
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=10)
    if server.poll() is None:
        server.kill()
        server.wait()
    server.stdout.close()


def _key(path: Path, task: str, spec: EvalSpec, texts: list[Texts], layers: list[str], device: str) -> str:
    """Everything a measurement depends on: the weights (names, sizes, mtimes), the text, the
    settings that change the numbers, the libraries and the threads."""
    import transformers

    ident = {
        "path": str(path.resolve()),
        "weights": fingerprint(path),
        "task": task,
        "eval": spec.model_dump(
            exclude={"enabled", "latency", "prompt_len", "new_tokens", "latency_rounds", "reuse_base", "kl_divergence"}
        ),
        "texts": [hashlib.sha256("\x00".join(t.texts).encode()).hexdigest() for t in texts],
        "text": [t.description for t in texts],
        "layers": layers,
        "device": device,
        "threads": torch.get_num_threads(),
        "versions": [compress.__version__, torch.__version__, transformers.__version__],
        "worker": "forked",  # its peak memory lacks a new interpreter's import-time peak: 478 vs 550 MiB (tiny llama)
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def _cached(key: str, keep_embeddings: Path | None) -> Measurement | None:
    entry = _entries() / f"{key}.json"
    try:
        m = Measurement.model_validate_json(entry.read_text())
        emb = entry.with_suffix(".pt")
        if keep_embeddings is not None and m.similarity is None and emb.is_file():
            shutil.copyfile(emb, keep_embeddings)
        elif keep_embeddings is not None and m.perplexity is None:
            return None  # an encoder's entry without its embeddings
    except (OSError, ValueError):
        return None  # none yet, or unreadable: measure again
    return m


def _store(key: str, m: Measurement, embeddings: Path | None) -> None:
    """Written whole or not at all (rename), so a concurrent run never reads half an entry."""
    entry = _entries() / f"{key}.json"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        if embeddings is not None:
            tmp = entry.with_suffix(f".pt.{os.getpid()}")
            shutil.copyfile(embeddings, tmp)
            os.replace(tmp, entry.with_suffix(".pt"))
        tmp = entry.with_suffix(f".json.{os.getpid()}")
        tmp.write_text(m.model_copy(update={"reused_from": datetime.datetime.now(datetime.timezone.utc)
                                            .isoformat(timespec="seconds")}).model_dump_json())  # fmt: skip
        os.replace(tmp, entry)
    except OSError:
        pass  # a cache that cannot be written costs only time


def _entries() -> Path:
    """Read at call time: COMPRESS_CACHE may change between runs."""
    return cache_dir() / "measurements"


@dataclass(frozen=True)
class Measured:
    measurement: Measurement
    base_latency: Latency | None  # the baseline's, when timed with it
    speed: Speed | None
