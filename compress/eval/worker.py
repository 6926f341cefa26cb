"""Measure one checkpoint in a fresh process, loaded by plain transformers.

Run as `python -m compress.eval.worker REQUEST.json RESULT.json`. A fresh process makes
the peak memory its own, and loading through `from_pretrained` measures exactly what a
user gets, not our in-memory model.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from compress.eval import embedding, latency, memory, perplexity, size
from compress.formats import sparse
from compress.report.schema import Latency, Measurement, Perplexity


def measure(req: dict) -> dict:
    path = Path(req["path"])
    if not sparse.is_sparse(path):
        return _measure(req, path)
    with tempfile.TemporaryDirectory(prefix="compress-dense-") as tmp:  # what compress reads back
        return _measure(req, sparse.densify(path, Path(tmp) / "dense"))


def _measure(req: dict, load_from: Path) -> dict:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path, spec = Path(req["path"]), req["eval"]
    cls = AutoModelForCausalLM if req["task"] == "causal-lm" else AutoModel
    start = time.perf_counter()
    model = cls.from_pretrained(load_from, trust_remote_code=req["trust_remote_code"]).to(req["device"]).eval()
    load_s = time.perf_counter() - start
    tok = AutoTokenizer.from_pretrained(load_from, trust_remote_code=req["trust_remote_code"])
    quant_config = json.loads((path / "config.json").read_text()).get("quantization_config")
    out: dict = {
        "path": str(path),
        "bytes_on_disk": size.bytes_on_disk(path),
        "bits_per_weight": size.bits_per_weight(path, req["layers"]),
        "load_seconds": load_s,
    }
    texts = req["texts"]
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    device = next(model.parameters()).device
    if req["task"] == "causal-lm":
        windows = perplexity.token_windows(tok, texts, spec["seq_len"], spec["max_tokens"])
        ppl = perplexity.perplexity(model, windows)
        out["perplexity"] = Perplexity(
            value=ppl, text=req["text_desc"], seq_len=windows.shape[1], tokens=windows.numel()
        ).model_dump()
        if spec["latency"]:
            prompt = windows.flatten()[: spec["prompt_len"]].unsqueeze(0)
            kernel = latency.kernel_name(model, quant_config)
            if not quant_config:  # after the perplexity, which stays on the dense weights
                kernel = latency.with_sparse24(model, path, kernel)
            speed = latency.causal_lm(model, prompt, spec["new_tokens"])
            out["latency"] = Latency(
                **speed,
                prompt_len=prompt.shape[1],
                new_tokens=spec["new_tokens"],
                kernel=kernel,
                device=latency.device_name(device),
                dtype=dtype,
            ).model_dump()
    else:
        sents = embedding.sentences(texts, spec["max_texts"])
        torch.save(embedding.embed(model, tok, sents), req["embeddings_out"])
        if spec["latency"]:
            ids = tok(" ".join(sents), return_tensors="pt", truncation=True, max_length=spec["prompt_len"]).input_ids
            speed = latency.encoder(model, ids)
            out["latency"] = Latency(
                **speed,
                prompt_len=ids.shape[1],
                new_tokens=None,
                kernel=latency.kernel_name(model, quant_config),
                device=latency.device_name(device),
                dtype=dtype,
            ).model_dump()
    # After the forward passes: compressed-tensors decompresses on the first one.
    params = {id(p): p for p in model.parameters()}  # tied weights count once
    out["parameters"] = sum(p.numel() for p in params.values())
    out["weights_in_memory_bytes"] = sum(p.numel() * p.element_size() for p in params.values()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    out["peak_rss_bytes"] = memory.peak_rss()
    return Measurement(**out).model_dump()


def main() -> None:
    req_path, out_path = sys.argv[1], sys.argv[2]
    result = measure(json.loads(Path(req_path).read_text()))
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
