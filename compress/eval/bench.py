"""Side-by-side speed of a model and its baseline: the same greedy protocol (runtime/loop.py)
on every runtime, rounds interleaved in one process, medians reported."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from compress.data import text as textdata
from compress.errors import UsageError
from compress.eval.latency import cpu_name, kernel_name, with_sparse24
from compress.export import onnx_decoder, onnx_export
from compress.export.onnx_export import MODEL_FILE
from compress.formats.gguf_meta import arch_int
from compress.formats.stored import activation_kind, quantization_config, read
from compress.models import arch, load as loading, source as sources
from compress.runtime import loop, ort
from compress.runtime.llama_cpp import LlamaCppDecoder
from compress.runtime.torch_decoder import TorchDecoder
from compress.runtime.torch_kernels import use_kernels

RUNTIMES = ("torch", "onnxruntime", "llama.cpp")


@dataclass
class Subject:
    role: str  # "model" or "baseline"
    spec: str
    decoder: loop.Decoder
    dtype: str
    tokenizer_dir: Path | None
    memory_bytes: int = 0  # resident memory added by loading it and its first round


@dataclass(frozen=True)
class Row:
    role: str
    spec: str
    runtime: str
    kernel: str
    dtype: str
    batch: int
    ttft_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    memory_bytes: int
    prefill_speedup: float | None = None  # against the baseline at the same batch
    decode_speedup: float | None = None


def _rss() -> int:
    return psutil.Process().memory_info().rss


def open_torch(spec: str, device: str) -> tuple[loop.Decoder, str, Path]:
    loaded = loading.load(
        sources.resolve(spec), dtype="float32" if device == "cpu" else "bfloat16", device=device, quantized=True
    )
    if loaded.task != "causal-lm":
        raise UsageError(f"compress bench measures decoders (prefill + decode); {spec} is an encoder")
    qc = quantization_config(loaded.checkpoint)
    kernel = kernel_name(loaded.model, qc)
    if loaded.quantized and device == "cuda":  # real low-bit kernels; a fallback warns why
        kernel = use_kernels(loaded.model, read(loaded.checkpoint), activation_kind(qc))
    elif loaded.quantized:
        kernel = f"torch dense {next(loaded.model.parameters()).dtype} matmul (weights de-quantized at load)".replace(
            "torch.", ""
        )
    else:
        kernel = with_sparse24(loaded.model, loaded.checkpoint, kernel)
    return (
        TorchDecoder(loaded.model, kernel),
        str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        loaded.checkpoint,
    )


def open_onnx(spec: str, threads: int, workdir: Path, accuracy_level: int | None) -> tuple[loop.Decoder, str, Path]:
    path = Path(spec)
    if not (path / onnx_export.MODEL_FILE).is_file():  # a checkpoint: export it first
        loaded = loading.load(sources.resolve(spec), dtype="float32", quantized=True)
        if loaded.task != "causal-lm":
            raise UsageError(f"compress bench measures decoders (prefill + decode); {spec} is an encoder")
        path = Path(tempfile.mkdtemp(prefix="onnx-", dir=workdir))
        onnx_export.export(loaded, path, onnx_decoder.Options(accuracy_level), threads)
        del loaded
    return ort.OrtDecoder(ort.session(path / onnx_export.MODEL_FILE, threads), describe_onnx(path)), "float32", path


def describe_onnx(path: Path) -> str:
    import onnxruntime

    kernel = f"onnxruntime {onnxruntime.__version__} CPU"
    info = path / "export.json"
    if info.is_file():
        e = json.loads(info.read_text())
        if e["nbits_layers"]:
            import onnx

            graph = onnx.load(str(path / MODEL_FILE), load_external_data=False).graph
            node = next(n for n in graph.node if n.op_type == "MatMulNBits")
            a = {x.name: x.i for x in node.attribute}
            acts = ", inputs rounded to int8 per token" if e.get("act_int8") else ""
            acts += " with a zero point" if e.get("act_zero_point") else ""
            level = a.get("accuracy_level", 0)
            return f"{kernel}, MatMulNBits {a['bits']}-bit blocks of {a['block_size']}, accuracy_level {level}{acts}"
    return f"{kernel}, float32 MatMul"


def open_llama_cpp(spec: str, threads: int, n_ctx: int) -> tuple[loop.Decoder, str, Path | None]:
    path = Path(spec)
    gguf = path if path.suffix == ".gguf" else next(iter(sorted(path.glob("*.gguf"))), None)
    if gguf is None or not gguf.is_file():
        raise UsageError(
            f"--runtime llama.cpp needs a .gguf file (or a directory from `compress export --format gguf`): {spec}"
        )
    tok = gguf.parent if (gguf.parent / "tokenizer.json").is_file() else None
    return LlamaCppDecoder(gguf, threads, n_ctx), "gguf", tok


def context_length(spec: str) -> int | None:
    """Positions the model can take (config.json's, or the GGUF's context length); None when unknown."""
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGUFReader

        try:
            return arch_int(GGUFReader(path), "context_length")
        except Exception:  # noqa: BLE001 - an unreadable file is reported when it is opened
            return None
    if not path.is_dir():
        try:
            path = sources.resolve(spec).path
        except UsageError:
            return None
        if path.suffix == ".gguf":
            return context_length(str(path))
    config = path / "config.json"
    if not config.is_file():
        return None
    return arch.max_positions(json.loads(config.read_text()))


def open_subject(
    role: str, spec: str, runtime: str, threads: int, device: str, workdir: Path, accuracy_level: int | None, n_ctx: int
) -> Subject:
    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime != "torch" and device != "cpu":
        raise UsageError(f"--device {device}: the {runtime} runtime is measured on CPU here")
    before = _rss()
    if runtime == "torch":
        dec, dtype, tok = open_torch(spec, device)
    elif runtime == "onnxruntime":
        dec, dtype, tok = open_onnx(spec, threads, workdir, accuracy_level)
    else:
        dec, dtype, tok = open_llama_cpp(spec, threads, n_ctx)
    return Subject(role, spec, dec, dtype, tok, _rss() - before)


def prompt_ids(tokenizer_dir: Path, length: int) -> np.ndarray:
    """[length] token ids of the built-in evaluation text (repeated if it is shorter)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok("\n\n".join(textdata.builtin("evaluation").texts), add_special_tokens=False).input_ids
    reps = -(-length // len(ids))
    return np.array((ids * reps)[:length], dtype=np.int64)


def measure(subjects: list[Subject], batches: list[int], prompt_len: int, new_tokens: int, rounds: int) -> list[Row]:
    tok_dir = next((s.tokenizer_dir for s in subjects if s.tokenizer_dir is not None), None)
    if tok_dir is None:
        raise UsageError(
            "no tokenizer found beside any of the models (a GGUF alone has none here): pass a baseline checkpoint"
        )
    ids = prompt_ids(tok_dir, prompt_len)
    rows: list[Row] = []
    for batch in batches:
        prompt = np.tile(ids, (batch, 1))
        for s in subjects:  # warm-up: graph optimization, allocator arenas, caches
            before = _rss()
            loop.one_round(s.decoder, prompt, min(new_tokens, 8))
            s.memory_bytes += max(0, _rss() - before)
        timings: dict[str, list[loop.Timing]] = {s.role: [] for s in subjects}
        for _ in range(rounds):
            for s in subjects:
                timings[s.role].append(loop.one_round(s.decoder, prompt, new_tokens))
        med = {s.role: loop.median(timings[s.role]) for s in subjects}
        base = med.get("baseline")
        for s in subjects:
            m = med[s.role]
            rows.append(
                Row(
                    s.role,
                    s.spec,
                    s.decoder.runtime,
                    s.decoder.kernel,
                    s.dtype,
                    batch,
                    m.ttft_s * 1e3,
                    m.prefill_tokens_per_s,
                    m.decode_tokens_per_s,
                    s.memory_bytes,
                    m.prefill_tokens_per_s / base.prefill_tokens_per_s if base and s.role != "baseline" else None,
                    m.decode_tokens_per_s / base.decode_tokens_per_s if base and s.role != "baseline" else None,
                )
            )
    return rows


def environment(threads: int, device: str) -> dict:
    name = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    return {"device": f"{device} ({name})", "threads": threads, "torch": torch.__version__}


def as_json(env: dict, args: dict, rows: list[Row]) -> str:
    return json.dumps({**env, **args, "rows": [asdict(r) for r in rows]}, indent=2)
