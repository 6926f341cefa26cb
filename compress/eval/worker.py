"""Measure one checkpoint in a new process, loaded by plain transformers.

`measure.measure` has it forked (`child`) by a server process that has only imported this
module (`server.py`). A new process makes the peak memory its own, and loading through
`from_pretrained` measures exactly what a user gets, not our in-memory model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.eval import divergence, embedding, latency, memory, perplexity, size, tasks
from compress.formats import sparse
from compress.models.arch import max_positions
from compress.models.compute import compute_dtype, float32_bytes, stored_dtype
from compress.report.schema import Latency, Measurement, Perplexity, Speed


def measure(req: dict) -> dict:
    """{"measurement": the checkpoint's Measurement, "base_latency": the baseline's Latency or
    None, "speed": Speed or None}. With `timed_with` (the baseline's path) the latency rounds of
    both are interleaved in this process, after this checkpoint's memory was read; with
    `compared_with` (a decoder's baseline) its divergence from the baseline is measured there too."""
    with contextlib.ExitStack() as stack:
        load = functools.partial(_load, req=req, stack=stack)
        path = Path(req["path"])
        model, tok, seconds = load(path)
        out, prompt, windows = _measure(req, path, model, tok, seconds)
        others = _other_domains(req, model, tok) if req["task"] == "causal-lm" else []
        out["domains"] = [{"perplexity": p} for p, _ in others]
        bases = {}  # path -> the baseline model, loaded once for the divergence and the timing
        if req.get("compared_with"):  # after this model's memory was read
            base = bases[req["compared_with"]] = load(Path(req["compared_with"]))[0]
            out["divergence"] = divergence.compare(base, model, windows, req["text_desc"]).model_dump()
            for domain, (p, wins) in zip(out["domains"], others):
                domain["divergence"] = divergence.compare(base, model, wins, p["text"]).model_dump()
        if not req["eval"]["latency"]:
            return {"measurement": out, "base_latency": None, "speed": None}
        subjects = [(path, model)]
        if req.get("timed_with"):
            base = req["timed_with"]
            subjects.insert(0, (Path(base), bases[base] if base in bases else load(Path(base))[0]))
        kernels = [_kernel(req, p, m) for p, m in subjects]  # before timing: may swap in sparse kernels
        rounds = latency.interleaved([_round(req, m, prompt) for _, m in subjects], req["eval"]["latency_rounds"])
        lats = [_latency(req, m, k, prompt, r) for (_, m), k, r in zip(subjects, kernels, rounds)]
        out["latency"] = lats[-1]
        both = len(subjects) == 2
        speed = Speed(**latency.compare(rounds[0], rounds[1])).model_dump() if both else None
        return {"measurement": out, "base_latency": lats[0] if both else None, "speed": speed}


def _load(path: Path, req: dict, stack: contextlib.ExitStack) -> tuple[torch.nn.Module, object, float]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    load_from = path
    if sparse.is_sparse(path):  # what compress reads back
        load_from = sparse.densify(path, Path(stack.enter_context(tempfile.TemporaryDirectory())) / "dense")
    cls = AutoModelForCausalLM if req["task"] == "causal-lm" else AutoModel
    trust, start = req["trust_remote_code"], time.perf_counter()
    config = json.loads((load_from / "config.json").read_text())
    stored = stored_dtype(config)
    dtype = compute_dtype(stored, req["device"], float32_bytes(load_from, config.get("quantization_config")))
    model, info = cls.from_pretrained(load_from, trust_remote_code=trust, dtype=dtype, output_loading_info=True)
    if missing := sorted(info.get("missing_keys") or []):  # transformers started them from random values
        raise CompressError(
            f"{path}: plain transformers reloads it with {len(missing)} weights missing ({missing[0]}, ...) and "
            "starts them from random values: there is nothing meaningful to measure"
        )
    model = model.to(req["device"]).eval()
    seconds = time.perf_counter() - start
    return model, AutoTokenizer.from_pretrained(load_from, trust_remote_code=trust), seconds


def _perplexity(req: dict, model: torch.nn.Module, tok, texts: list[str], desc: str) -> tuple[dict, torch.Tensor]:
    """Perplexity on the evaluation windows of `texts` (a Perplexity), and the windows."""
    spec = req["eval"]
    seq_len, limit = spec["seq_len"], max_positions(model.config)
    windows = perplexity.token_windows(tok, texts, seq_len, spec["max_tokens"], limit)
    ppl = perplexity.perplexity(model, windows)
    protocol = Perplexity.model_fields["protocol"].default
    if limit and seq_len > limit:
        protocol += f"; windows of {seq_len} shortened to the model's {limit} positions"
    measured = Perplexity(value=ppl, text=desc, seq_len=windows.shape[1], tokens=windows.numel(), protocol=protocol)
    return measured.model_dump(), windows


def _other_domains(req: dict, model: torch.nn.Module, tok) -> list[tuple[dict, torch.Tensor]]:
    """`evaluate.also`: perplexity and windows on each further text, after the memory was read."""
    return [_perplexity(req, model, tok, t["texts"], t["desc"]) for t in req.get("also", [])]


def _measure(
    req: dict, path: Path, model: torch.nn.Module, tok, load_s: float
) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """Size, quality and memory; the prompt the latency rounds use; a decoder's perplexity windows."""
    spec, texts = req["eval"], req["texts"]
    out: dict = {
        "path": str(path),
        "bytes_on_disk": size.bytes_on_disk(path),
        "bits_per_weight": size.bits_per_weight(path, req["layers"]),
        "load_seconds": load_s,
    }
    if req["task"] == "causal-lm":
        out["perplexity"], windows = _perplexity(req, model, tok, texts, req["text_desc"])
        prompt = windows.flatten()[: spec["prompt_len"]].unsqueeze(0)
    else:
        windows = None
        sents = embedding.sentences(texts, spec["max_texts"])
        torch.save(embedding.embed(model, tok, sents), req["embeddings_out"])
        prompt = tok(" ".join(sents), return_tensors="pt", truncation=True, max_length=spec["prompt_len"]).input_ids
    # After the forward passes: compressed-tensors decompresses on the first one.
    params = {id(p): p for p in model.parameters()}  # tied weights count once
    out["parameters"] = sum(p.numel() for p in params.values())
    out["weights_in_memory_bytes"] = sum(p.numel() * p.element_size() for p in params.values()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    out["peak_rss_bytes"] = memory.peak_rss()  # before lm-eval, and before a baseline is loaded for the timing
    if spec["tasks"]:
        out["tasks"] = tasks.run(model, tok, spec["tasks"], spec["task_limit"])
    return Measurement(**out).model_dump(), prompt, windows


def _round(req: dict, model: torch.nn.Module, prompt: torch.Tensor):
    if req["task"] == "causal-lm":
        return latency.decoder_round(model, prompt, req["eval"]["new_tokens"])
    return latency.encoder_round(model, prompt)


def _kernel(req: dict, path: Path, model: torch.nn.Module) -> str:
    quant_config = json.loads((path / "config.json").read_text()).get("quantization_config")
    kernel = latency.kernel_name(model, quant_config)
    if req["task"] == "causal-lm" and not quant_config:  # after the perplexity, which stays on dense weights
        kernel = latency.with_sparse24(model, path, kernel)
    return kernel


def _latency(req: dict, model: torch.nn.Module, kernel: str, prompt: torch.Tensor, rounds: list) -> dict:
    prefill = latency.spread([r[0] for r in rounds])
    decode = latency.spread([r[1] for r in rounds]) if rounds[0][1] is not None else None
    return Latency(
        prefill_tokens_per_s=prefill[0],
        decode_tokens_per_s=decode and decode[0],
        prefill_range=list(prefill[1:]),
        decode_range=decode and list(decode[1:]),
        rounds=len(rounds),
        prompt_len=prompt.shape[1],
        new_tokens=req["eval"]["new_tokens"] if req["task"] == "causal-lm" else None,
        kernel=kernel,
        device=latency.device_name(next(model.parameters()).device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
    ).model_dump()


def child(req_path: str, out_path: str, log_path: str, env: dict[str, str], cwd: str) -> None:
    """A measuring process forked by `server`: the caller's environment and directory (the
    server's are those of its start), its output to `log_path`; the request read from `req_path`,
    the result written to `out_path`."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    tempfile.tempdir = None  # chosen again from this environment's TMPDIR
    if env.get("OMP_NUM_THREADS", "").isdigit():  # read by OpenMP when the server started
        torch.set_num_threads(max(1, int(env["OMP_NUM_THREADS"])))
    result = measure(json.loads(Path(req_path).read_text()))
    Path(out_path).write_text(json.dumps(result))
