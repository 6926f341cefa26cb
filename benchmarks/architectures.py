"""Every command on tiny random models of architectures the test suite does not build: which ones work, which are
refused (and with what one line), and that none ends in a traceback.

    .venv/bin/python benchmarks/architectures.py [--archs gemma3_text,olmo2,...] [--work DIR]

Each model: 3 decoder layers of width 64 (4 query heads over 2 key/value heads), random bfloat16 weights, SmolLM2's
tokenizer, made by transformers' own `AutoConfig.for_model`. Commands (8 samples of 128 tokens where calibrated):
quantize w4a16 GPTQ / AWQ / SignRound (2 steps), w8a8 and fp8; prune 2:4 SparseGPT and structured (drop 1 layer,
half the MLP channels and query heads); export the GPTQ checkpoint to ONNX and GGUF; eval it against its base.
Prints one table row per architecture: `ok`, or the error's line shortened. Random weights say nothing of quality:
this measures reach and the handling of what is not supported.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ARCHS = {  # model_type -> config fields beyond the shared ones
    "gemma3_text": {"head_dim": 16},
    "olmo2": {},
    "olmo3": {},
    "granite": {},
    "cohere": {},
    "stablelm": {},
    "phi": {},
    "exaone4": {},
    "ernie4_5": {},
    "seed_oss": {},
    "helium": {"head_dim": 16},
    "arcee": {},
    "apertus": {},
    "hunyuan_v1_dense": {"head_dim": 16},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "llama4_text": {},
}
SHARED = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
CALIB = ["--samples", "8", "--seq-len", "128", "--no-eval"]
COMMANDS = {  # column -> arguments after `compress`, {m}: the model, {o}: this architecture's output folder
    "gptq": ["quantize", "{m}", "-o", "{o}/gptq", "--method", "gptq", "--group-size", "32", *CALIB],
    "awq": ["quantize", "{m}", "-o", "{o}/awq", "--method", "awq", "--group-size", "32", *CALIB],
    "signround": [
        "quantize",
        "{m}",
        "-o",
        "{o}/sr",
        "--method",
        "signround",
        "--signround-steps",
        "2",
        "--group-size",
        "32",
        *CALIB,
    ],  # fmt: skip
    "w8a8": ["quantize", "{m}", "-o", "{o}/w8a8", "--scheme", "w8a8", *CALIB],
    "fp8": ["quantize", "{m}", "-o", "{o}/fp8", "--scheme", "fp8", *CALIB],
    "2:4": ["prune", "{m}", "-o", "{o}/sparse", "--pattern", "2:4", *CALIB],
    "structured": [
        "prune",
        "{m}",
        "-o",
        "{o}/struct",
        "--method",
        "structured",
        "--drop-layers",
        "1",
        "--mlp-keep",
        "0.5",
        "--heads-keep",
        "0.5",
        *CALIB,
    ],  # fmt: skip
    "onnx": ["export", "{o}/gptq", "-o", "{o}/onnx", "-f", "onnx"],
    "gguf": ["export", "{o}/gptq", "-o", "{o}/gguf", "-f", "gguf"],
    "eval": ["eval", "{o}/gptq", "--baseline", "{m}", "--eval-tokens", "1024", "--no-latency"],
}


def make_models(dest: Path, archs: list[str]) -> dict[str, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from compress.models import source
    from compress.models.load import checkpoint_dir

    tok = AutoTokenizer.from_pretrained(checkpoint_dir(source.resolve("smollm2-135m"), "auto"))
    made = {}
    for arch in archs:
        cfg = AutoConfig.for_model(arch, vocab_size=len(tok), **SHARED, **ARCHS[arch])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
        model.save_pretrained(dest / arch)
        tok.save_pretrained(dest / arch)
        made[arch] = dest / arch
    return made


def run(args: list[str], arch: str) -> str:
    """`ok`, or the command's last stderr line (its one-line error), or `TRACEBACK` when it ended in one."""
    proc = subprocess.run(
        [sys.executable, "-m", "compress", *args], capture_output=True, text=True, timeout=900,
        env={**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )  # fmt: skip
    if "Traceback" in proc.stderr:
        return "TRACEBACK"
    if proc.returncode == 0:
        return "ok"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    line = lines[-1].removeprefix("error: ") if lines else f"exit {proc.returncode}"
    # the same refusal reads the same for every architecture
    return line.replace(str(Path(args[1]).parent), "DIR").replace(arch, "ARCH")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--work", type=Path, default=None, help="keep models and outputs here (default: a temp dir)")
    a = parser.parse_args()
    archs = a.archs.split(",")
    unknown = [x for x in archs if x not in ARCHS]
    if unknown:
        sys.exit(f"unknown architecture {unknown[0]!r}; known: {', '.join(ARCHS)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        models = make_models(work / "models", archs)
        print("| architecture | " + " | ".join(COMMANDS) + " |")
        print("|---" * (len(COMMANDS) + 1) + "|")
        counts = {"ok": 0, "refused": 0, "TRACEBACK": 0}
        notes: dict[str, list[str]] = {}
        for arch, path in models.items():
            out = work / "out" / arch
            cells = []
            for column, template in COMMANDS.items():
                got = run([t.format(m=path, o=out) for t in template], arch)
                kind = got if got in ("ok", "TRACEBACK") else "refused"
                counts[kind] += 1
                if kind == "refused":
                    notes.setdefault(got, []).append(f"{arch} {column}")
                    got = f"refused ({list(notes).index(got) + 1})"
                cells.append(got)
            print(f"| {arch} | " + " | ".join(cells) + " |", flush=True)
        print()
        for i, (line, where) in enumerate(notes.items(), 1):
            print(f"{i}. {line} ({', '.join(where)})")
        print(f"\n{counts['ok']} ok, {counts['refused']} refused in one line, {counts['TRACEBACK']} tracebacks")


if __name__ == "__main__":
    main()
