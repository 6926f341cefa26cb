"""Measure checkpoints through the worker process; compare an encoder's embeddings to its base."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from compress.data.text import Texts
from compress.errors import CompressError
from compress.eval.embedding import cosine
from compress.recipe import EvalSpec
from compress.report.schema import Measurement, Similarity


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
) -> Measurement:
    with tempfile.TemporaryDirectory(prefix="compress-eval-") as tmp:
        req = {
            "path": str(path),
            "task": task,
            "eval": spec.model_dump(),
            "texts": texts.texts,
            "text_desc": texts.description,
            "layers": layers,
            "device": device,
            "trust_remote_code": trust_remote_code,
            "embeddings_out": str(keep_embeddings or Path(tmp) / "emb.pt"),
        }
        req_file, out_file = Path(tmp) / "req.json", Path(tmp) / "out.json"
        req_file.write_text(json.dumps(req))
        proc = subprocess.run(
            [sys.executable, "-m", "compress.eval.worker", str(req_file), str(out_file)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise CompressError(f"measuring {path} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
        result = Measurement.model_validate_json(out_file.read_text())
        if task != "causal-lm" and base_embeddings is not None:
            mine = torch.load(req["embeddings_out"])
            mean, worst = cosine(torch.load(base_embeddings), mine)
            result.similarity = Similarity(mean=mean, min=worst, texts=len(mine), text=texts.description)
        return result
