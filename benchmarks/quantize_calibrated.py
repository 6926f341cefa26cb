"""Calibrated quantization (GPTQ, AWQ, SmoothQuant) on SmolLM2-135M, side by side with
llm-compressor's GPTQ when its virtual environment exists (`make bench-venv`).

    .venv/bin/python benchmarks/quantize_calibrated.py [--samples 64] [--seq-len 512] [--methods gptq,awq] \
        [--llmc sym] [--no-write]

Both toolkits get the same calibration tokens (built-in calibration split) and are scored on
the same held-out windows with the same protocol. Rewrites this script's section of
benchmarks/RESULTS.md. Times are ratios on a shared machine: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import write_section  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
LLMC_PY = Path(os.environ.get("LLMC_PYTHON", ROOT / ".venv-llmc" / "bin" / "python"))
RUNS = [
    ("w4a16", "rtn", ["--group-size", "64"]),
    ("w4a16", "gptq", ["--group-size", "64"]),
    ("w4a16", "gptq", ["--group-size", "64", "--offload"]),
    ("w4a16", "gptq", ["--group-size", "64", "--dtype", "float32"]),
    ("w4a16", "awq", ["--group-size", "64"]),
    ("w8a8", "rtn", []),
    ("w8a8", "smoothquant+gptq", []),
    ("w8a8", "smoothquant+rtn", []),
]


def ours(scheme: str, method: str, extra: list[str], samples: int, seq_len: int, tmp: Path) -> dict:
    out = tmp / "-".join([scheme, method, *(e.strip("-") for e in extra)])
    cmd = [
        sys.executable,
        "-m",
        "compress",
        "quantize",
        "smollm2-135m",
        "-o",
        str(out),
        "--scheme",
        scheme,
        "--method",
        method,
        "--samples",
        str(samples),
        "--seq-len",
        str(seq_len),
        "--no-latency",
        "--json",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1]}")
    rep = json.loads(proc.stdout)
    st = rep["stages"][0]
    return {
        "tool": "compress",
        "scheme": scheme,
        "method": " ".join([method, *(f for f in ("--offload", "float32") if f in extra)]),
        "base": rep["base"]["perplexity"]["value"],
        "ppl": rep["result"]["perplexity"]["value"],
        "seconds": st["seconds"],
        "peak": st["peak_memory_bytes"],
        "settings": ", ".join(
            f"{k}={v}"
            for k, v in st["settings"].items()
            if k not in ("scheme", "method", "group_choice", "activations")
        ),
    }


def token_files(samples: int, seq_len: int, tmp: Path) -> tuple[Path, Path, Path]:
    from transformers import AutoTokenizer

    from compress.data.text import builtin
    from compress.data.tokens import windows
    from compress.models.load import checkpoint_dir
    from compress.models.source import resolve

    base = checkpoint_dir(resolve("smollm2-135m"), "auto")
    tok = AutoTokenizer.from_pretrained(base)
    calib = windows(tok, builtin("calibration").texts, seq_len, samples * seq_len)
    ev = windows(tok, builtin("evaluation").texts, 512, 8192)
    (tmp / "calib.json").write_text(json.dumps(calib.tolist()))
    (tmp / "eval.json").write_text(json.dumps(ev.tolist()))
    return base, tmp / "calib.json", tmp / "eval.json"


def llmc(sym: bool, base: Path, calib: Path, ev: Path) -> dict | None:
    if not LLMC_PY.exists():
        return None
    cmd = [str(LLMC_PY), str(HERE / "llmc.py"), str(base), str(calib), str(ev), "gptq", "64", "sym" if sym else "asym"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        print(f"llm-compressor run failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "tool": "llm-compressor",
        "scheme": "w4a16",
        "method": "gptq" + ("" if sym else " (asymmetric)"),
        "base": None,
        "ppl": r["perplexity"],
        "seconds": r["seconds"],
        "peak": r["peak_rss_above_start"],
        "settings": r["settings"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--methods", default=",".join(dict.fromkeys(m for _, m, _ in RUNS)), help="compress methods to run (comma list)"
    )
    ap.add_argument("--llmc", default="sym,asym", help="llm-compressor GPTQ runs: sym, asym, both or none (comma list)")
    args = ap.parse_args()
    methods, llmc_runs = set(args.methods.split(",")), set(args.llmc.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as t:
        tmp = Path(t)
        base_dir, calib, ev = token_files(args.samples, args.seq_len, tmp)
        for scheme, method, extra in RUNS:
            if method not in methods:
                continue
            rows.append(ours(scheme, method, extra, args.samples, args.seq_len, tmp))
            print(rows[-1], flush=True)
        for sym in [s == "sym" for s in ("sym", "asym") if s in llmc_runs]:
            r = llmc(sym, base_dir, calib, ev)
            if r:
                rows.append(r)
                print(rows[-1], flush=True)
    base = rows[0]["base"]
    fp32_mib = 134.5e6 * 4 / 2**20
    gptq_s = next((r["seconds"] for r in rows if r["tool"] == "compress" and r["method"] == "gptq"), None)
    table = [
        "| tool | scheme | method | perplexity | vs base | time s | time vs compress gptq | peak memory MiB (x fp32 "
        "model) | settings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['seconds'] / gptq_s:.2f}x" if gptq_s else "-"
        table.append(
            f"| {r['tool']} | {r['scheme']} | {r['method']} | {r['ppl']:.3f} | "
            f"{(r['ppl'] / (r['base'] or base) - 1) * 100:+.2f}% | {r['seconds']:.0f} | "
            f"{ratio} | {r['peak'] / 2**20:.0f} ({r['peak'] / 2**20 / fp32_mib:.2f}x) | {r['settings']} |"
        )
    llmc_note = (
        "" if LLMC_PY.exists() else " llm-compressor was not installed (`make bench-venv`), so its rows are missing."
    )
    section = "\n".join(
        [
            "## Calibrated quantization (`benchmarks/quantize_calibrated.py`)",
            "",
            f"SmolLM2-135M-Instruct (base perplexity {base:.3f}, bfloat16). Calibration: {args.samples} samples x "
            f"{args.seq_len} tokens of the "
            "built-in calibration split, the same tokens for both toolkits. Perplexity: 8192 held-out tokens in "
            "windows of 512, the "
            "report's protocol; compress's rows are measured on the checkpoint reloaded by plain transformers, "
            "llm-compressor's on its "
            "in-memory model right after `oneshot`. Time: the whole quantize stage (compress) or `oneshot` call "
            "(llm-compressor), "
            f"measured in the same run on {os.cpu_count()} CPU cores. Peak memory: resident memory above the process "
            f"before the model "
            f"was loaded, against the fp32 model size ({fp32_mib:.0f} MiB). `gptq --offload` keeps decoder layers on "
            f"disk (one read at a "
            "time, each written once quantized); `gptq float32` runs with `--dtype float32` (forward passes and "
            "Hessians in float32; its "
            f"change is against the float32 base).{llmc_note}",
            "",
            *table,
        ]
    )
    print(section)
    if not args.no_write:
        write_section("quantize_calibrated", section)


if __name__ == "__main__":
    main()
