"""Calibrated quantization (GPTQ, AWQ, SmoothQuant) on SmolLM2-135M, side by side with
llm-compressor's GPTQ when its virtual environment exists (`make bench-venv`).

    .venv/bin/python benchmarks/quantize_calibrated.py [--samples 64] [--seq-len 512] [--methods gptq,awq] \
        [--runs LABEL,...] [--llmc sym] [--no-write]

Both toolkits get the same calibration tokens (built-in calibration split) and are scored on
the same windows of two domains with the same protocol: held-out help pages, and license texts no calibration
reads (`--dataset licenses`); perplexity, KL divergence from the base and top-1 agreement on each. Rewrites this
script's section of benchmarks/RESULTS.md. Times are ratios on a shared machine: compare within one run.
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
from results import cli, write_section  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
LLMC_PY = Path(os.environ.get("LLMC_PYTHON", ROOT / ".venv-llmc" / "bin" / "python"))
RUNS = [
    ("w4a16", "rtn", ["--group-size", "64"]),
    ("w4a16", "gptq", ["--group-size", "64"]),
    ("w4a16", "gptq", ["--group-size", "64", "--no-symmetric"]),
    ("w4a16", "gptq", ["--group-size", "64", "--offload"]),
    ("w4a16", "gptq", ["--group-size", "64", "--dtype", "float32"]),
    ("w4a16", "awq", ["--group-size", "64"]),
    ("w4a16", "awq", ["--group-size", "64", "--no-symmetric"]),
    ("w8a8", "rtn", []),
    ("w8a8", "smoothquant+gptq", []),
    ("w8a8", "smoothquant+rtn", []),
    ("fp8", "rtn", []),
    ("fp8", "gptq", []),
]
FLAGS = {"--offload": "--offload", "float32": "float32", "--no-symmetric": "--no-symmetric"}


def label(method: str, extra: list[str]) -> str:
    return " ".join([method, *(v for k, v in FLAGS.items() if k in extra)])


def domain(report: dict) -> dict:
    r = report["result"]
    return {
        "base": report["base"]["perplexity"]["value"],
        "ppl": r["perplexity"]["value"],
        "kl_mean": r["divergence"]["kl_mean"],
        "top1_agreement": r["divergence"]["top1_agreement"],
    }


def ours(scheme: str, method: str, extra: list[str], samples: int, seq_len: int, tmp: Path) -> dict:
    out = tmp / "-".join([scheme, method, *(e.strip("-") for e in extra)])
    rep = cli(
        "quantize", "smollm2-135m", "-o", str(out), "--scheme", scheme, "--method", method,
        "--samples", str(samples), "--seq-len", str(seq_len), *extra,
    )  # fmt: skip
    other = cli("eval", str(out), "--baseline", "smollm2-135m", "--dataset", "licenses")
    st = rep["stages"][0]
    return {
        "tool": "compress",
        "scheme": scheme,
        "method": label(method, extra),
        "domains": [domain(rep), domain(other)],
        "seconds": st["seconds"],
        "peak": st["peak_memory_bytes"],
        "settings": ", ".join(
            f"{k}={v}"
            for k, v in st["settings"].items()
            if k not in ("scheme", "method", "group_choice", "activations")
        ),
    }


def token_files(samples: int, seq_len: int, tmp: Path) -> tuple[Path, Path, str]:
    """The base's folder, the calibration windows' file and the evaluation windows' files (both domains, a comma
    list as benchmarks/llmc.py reads it)."""
    from transformers import AutoTokenizer

    from compress.data.text import builtin, load
    from compress.data.tokens import windows
    from compress.models.load import checkpoint_dir
    from compress.models.source import resolve

    base = checkpoint_dir(resolve("smollm2-135m"), "auto")
    tok = AutoTokenizer.from_pretrained(base)
    calib = windows(tok, builtin("calibration").texts, seq_len, samples * seq_len)
    (tmp / "calib.json").write_text(json.dumps(calib.tolist()))
    for name, texts in (("eval", builtin("evaluation")), ("eval2", load("licenses", "evaluation"))):
        (tmp / f"{name}.json").write_text(json.dumps(windows(tok, texts.texts, 512, 8192).tolist()))
    return base, tmp / "calib.json", f"{tmp / 'eval.json'},{tmp / 'eval2.json'}"


def llmc(sym: bool, base: Path, calib: Path, ev: str) -> dict | None:
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
        "domains": [
            {"ppl": d["perplexity"], "kl_mean": d["kl_mean"], "top1_agreement": d["top1_agreement"]}
            for d in r["domains"]
        ],
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
    ap.add_argument("--runs", help="only these rows, by scheme:label (w4a16:gptq --no-symmetric), comma list")
    ap.add_argument("--llmc", default="sym,asym", help="llm-compressor GPTQ runs: sym, asym, both or none (comma list)")
    args = ap.parse_args()
    methods, llmc_runs = set(args.methods.split(",")), set(args.llmc.split(","))
    only = set(args.runs.split(",")) if args.runs else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as t:
        tmp = Path(t)
        base_dir, calib, ev = token_files(args.samples, args.seq_len, tmp)
        for scheme, method, extra in RUNS:
            if method not in methods or only is not None and f"{scheme}:{label(method, extra)}" not in only:
                continue
            rows.append(ours(scheme, method, extra, args.samples, args.seq_len, tmp))
            print(rows[-1], flush=True)
        for sym in [s == "sym" for s in ("sym", "asym") if s in llmc_runs]:
            r = llmc(sym, base_dir, calib, ev)
            if r:
                rows.append(r)
                print(rows[-1], flush=True)
    bases = [d["base"] for d in next(r for r in rows if r["tool"] == "compress")["domains"]]
    fp32_mib = 134.5e6 * 4 / 2**20
    gptq_s = next((r["seconds"] for r in rows if r["tool"] == "compress" and r["method"] == "gptq"), None)
    table = [
        "| tool | scheme | method | ppl 1 (change) | KL 1 | top-1 1 | ppl 2 (change) | KL 2 | top-1 2 | time s | "
        "time vs compress gptq | peak memory MiB (x fp32 model) | settings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['seconds'] / gptq_s:.2f}x" if gptq_s else "-"
        cells = [r["tool"], r["scheme"], r["method"]]
        for d, base in zip(r["domains"], bases):
            base = d.get("base", base)
            cells += [
                f"{d['ppl']:.3f} ({(d['ppl'] / base - 1) * 100:+.2f}%)",
                f"{d['kl_mean']:.3f}",
                f"{d['top1_agreement']:.1%}",
            ]
        cells += [
            f"{r['seconds']:.0f}",
            ratio,
            f"{r['peak'] / 2**20:.0f} ({r['peak'] / 2**20 / fp32_mib:.2f}x)",
            r["settings"],
        ]
        table.append("| " + " | ".join(cells) + " |")
    llmc_note = (
        "" if LLMC_PY.exists() else " llm-compressor was not installed (`make bench-venv`), so its rows are missing."
    )
    section = "\n".join(
        [
            "## Calibrated quantization (`benchmarks/quantize_calibrated.py`)",
            "",
            f"SmolLM2-135M-Instruct, bfloat16 base. Calibration: {args.samples} samples x {args.seq_len} tokens of the "
            "built-in calibration split, the same tokens for both toolkits. Two evaluation domains, 8192 tokens each "
            f"in windows of 512: 1, held-out help pages (base perplexity {bases[0]:.3f}); 2, license texts no "
            f"calibration reads (`--dataset licenses`, base {bases[1]:.3f}). KL: mean KL(base || result) per "
            "position; top-1: positions whose most likely next token is unchanged. compress's rows are measured on "
            "the checkpoint reloaded by plain transformers (`compress quantize`'s report, then `compress eval "
            "--baseline --dataset licenses`); llm-compressor's on its in-memory model right after `oneshot`, in "
            "bfloat16, against a copy of the base made before it. Time: the whole quantize stage (compress) or "
            f"`oneshot` call (llm-compressor), measured in the same run on {os.cpu_count()} CPU cores. Peak memory: "
            "resident memory above the process before the model was loaded, against the fp32 model size "
            f"({fp32_mib:.0f} MiB). `gptq --offload` keeps decoder layers on disk (one read at a time, each written "
            "once quantized); `gptq float32` runs with `--dtype float32` (forward passes and Hessians in float32; "
            f"its change is against the float32 base).{llmc_note}",
            "",
            *table,
        ]
    )
    print(section)
    if not args.no_write:
        write_section("quantize_calibrated", section)


if __name__ == "__main__":
    main()
