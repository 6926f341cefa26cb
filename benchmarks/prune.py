"""Pruning on SmolLM2-135M: magnitude, Wanda and SparseGPT (50% unstructured and 2:4), sparse
storage, and structured pruning, side by side with llm-compressor's SparseGPT when its virtual
environment exists (`make bench-venv`).

    .venv/bin/python benchmarks/prune.py [--samples 64] [--seq-len 512] [--no-llmc] [--no-write]

Both toolkits get the same calibration tokens and are scored on the same held-out windows with
the same protocol. Rewrites this script's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from quantize_calibrated import LLMC_PY, token_files  # noqa: E402
from results import write_section  # noqa: E402

HERE = Path(__file__).parent
RUNS = [  # (name, compress prune options)
    ("magnitude 50%", ["--method", "magnitude"]),
    ("wanda 50%", ["--method", "wanda"]),
    ("sparsegpt 50%", ["--method", "sparsegpt"]),
    ("sparsegpt 50% --storage sparse", ["--method", "sparsegpt", "--storage", "sparse"]),
    ("magnitude 2:4", ["--method", "magnitude", "--pattern", "2:4"]),
    ("wanda 2:4", ["--method", "wanda", "--pattern", "2:4"]),
    ("sparsegpt 2:4", ["--method", "sparsegpt", "--pattern", "2:4"]),
    ("structured: drop 6 layers, keep 75% MLP", ["--method", "structured", "--drop-layers", "6", "--mlp-keep", "0.75"]),
]


def ours(name: str, opts: list[str], samples: int, seq_len: int, tmp: Path) -> dict:
    out = tmp / name.replace(" ", "_").replace("%", "").replace(":", "-").replace(",", "")
    latency = [] if "structured" in name else ["--no-latency"]
    cmd = [
        sys.executable,
        "-m",
        "compress",
        "prune",
        "smollm2-135m",
        "-o",
        str(out),
        *opts,
        "--samples",
        str(samples),
        "--seq-len",
        str(seq_len),
        *latency,
        "--eval-also",
        "licenses",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1]}")
    rep = json.loads(proc.stdout)
    st, base, res = rep["stages"][0], rep["base"], rep["result"]
    row = {
        "tool": "compress",
        "name": name,
        "domains": domains(rep),
        "seconds": st["seconds"],
        "bytes": res["bytes_on_disk"],
        "base_bytes": base["bytes_on_disk"],
        "params": res["parameters"],
        "base_params": base["parameters"],
        "dir": out,
    }
    if rep.get("speed"):  # base and result timed in one process, rounds interleaved
        row["speedup"] = rep["speed"]
        row["latency_note"] = (
            f"{res['latency']['kernel']}, {res['latency']['device']}, batch 1, prompt {res['latency']['prompt_len']}, "
            f"{res['latency']['new_tokens']} new tokens"
        )
    return row


RECIPE = """\
model: smollm2-135m
stages:
  - {stage: prune, method: sparsegpt, pattern: "2:4", samples: %(samples)d, seq_len: %(seq_len)d}
  - {stage: quantize, scheme: w4a16, method: gptq, group_size: 64, samples: %(samples)d, seq_len: %(seq_len)d}
evaluate: {latency: false, also: [licenses]}
"""


def domains(rep: dict) -> list[dict]:
    """Perplexity (with the base's), KL and top-1 on the held-out pages and on the license texts."""
    b, r = rep["base"], rep["result"]
    return [
        {"base": bp["value"], "ppl": rp["value"], "kl": d["kl_mean"], "top1": d["top1_agreement"]}
        for bp, rp, d in [
            (b["perplexity"], r["perplexity"], r["divergence"]),
            (b["domains"][0]["perplexity"], r["domains"][0]["perplexity"], r["domains"][0]["divergence"]),
        ]
    ]


def combined(samples: int, seq_len: int, tmp: Path) -> dict:
    """prune 2:4 then GPTQ w4a16 in one recipe; checks that the reloaded weights still hold 2:4."""
    from transformers import AutoModelForCausalLM

    from compress.primitives.masks import n_of_m_holds

    (tmp / "recipe.yaml").write_text(RECIPE % {"samples": samples, "seq_len": seq_len})
    out = tmp / "2of4-gptq"
    cmd = [sys.executable, "-m", "compress", "run", str(tmp / "recipe.yaml"), "-o", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1]}")
    rep = json.loads(proc.stdout)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    if not all(n_of_m_holds(m.weight, 2, 4) for m in linears):
        sys.exit("2:4 did not survive quantization")
    res, base = rep["result"], rep["base"]
    return {
        "tool": "compress",
        "name": "recipe: sparsegpt 2:4 -> gptq w4a16 g64 (2:4 checked after reload)",
        "domains": domains(rep),
        "seconds": sum(st["seconds"] for st in rep["stages"]),
        "bytes": res["bytes_on_disk"],
        "base_bytes": base["bytes_on_disk"],
        "params": res["parameters"],
        "base_params": base["parameters"],
    }


def dense_weights(path: Path) -> dict[str, torch.Tensor]:
    from compress.formats import sparse

    if sparse.is_sparse(path):
        path = sparse.densify(path, path.with_name(path.name + "-dense"))
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def llmc(sparsity: float, pattern: str, base: Path, calib: Path, ev: str) -> dict | None:
    if not LLMC_PY.exists():
        return None
    cmd = [str(LLMC_PY), str(HERE / "llmc.py"), str(base), str(calib), str(ev), "sparsegpt", str(sparsity), pattern]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        print(f"llm-compressor run failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    name = f"sparsegpt {'50%' if pattern == 'unstructured' else pattern}"
    return {
        "tool": "llm-compressor",
        "name": name,
        "domains": [{"ppl": d["perplexity"], "kl": d["kl_mean"], "top1": d["top1_agreement"]} for d in r["domains"]],
        "seconds": r["seconds"],
        "settings": r["settings"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-llmc", action="store_true")
    ap.add_argument("--runs", help="only these compress rows, by name, comma list (default: all)")
    args = ap.parse_args()
    runs = [(n, o) for n, o in RUNS if not args.runs or n in args.runs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="compress-bench-prune-") as t:
        tmp = Path(t)
        base_dir, calib, ev = token_files(args.samples, args.seq_len, tmp)
        for name, opts in runs:
            rows.append(ours(name, opts, args.samples, args.seq_len, tmp))
            print({k: v for k, v in rows[-1].items() if k != "dir"}, flush=True)
        rows.append(combined(args.samples, args.seq_len, tmp))
        print(rows[-1], flush=True)
        pair = [
            next((r for r in rows if r["name"] == n), None) for n in ("sparsegpt 50%", "sparsegpt 50% --storage sparse")
        ]
        dense, packed = pair
        identical = None
        if dense and packed:
            a, b = dense_weights(dense["dir"]), dense_weights(packed["dir"])
            identical = a.keys() == b.keys() and all(
                torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
            )
        if not args.no_llmc:
            for pattern in ("unstructured", "2:4"):
                if r := llmc(0.5, pattern, base_dir, calib, ev):
                    rows.append(r)
                    print(r, flush=True)
    bases = [d["base"] for d in rows[0]["domains"]]
    table = [
        "| tool | method | ppl 1 (change) | KL 1 | top-1 1 | ppl 2 (change) | KL 2 | top-1 2 | time s | "
        "size on disk vs base | parameters vs base |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = f"{r['bytes'] / r['base_bytes']:.3f}x" if "bytes" in r else "-"
        params = f"{r['params'] / r['base_params']:.3f}x" if "params" in r else "-"
        cells = [r["tool"], r["name"]]
        for d, base in zip(r["domains"], bases):
            cells += [f"{d['ppl']:.3f} ({(d['ppl'] / base - 1) * 100:+.1f}%)", f"{d['kl']:.3f}", f"{d['top1']:.1%}"]
        table.append("| " + " | ".join([*cells, f"{r['seconds']:.0f}", size, params]) + " |")
    structured = next((r for r in rows if r["name"].startswith("structured")), None)
    speed = structured and structured.get("speedup")
    llmc_note = (
        ""
        if LLMC_PY.exists() and not args.no_llmc
        else " llm-compressor was not run (`make bench-venv`), so its rows are missing."
    )
    section = "\n".join(
        [
            "## Pruning (`benchmarks/prune.py`)",
            "",
            f"SmolLM2-135M-Instruct, bfloat16. Calibration: {args.samples} samples x "
            f"{args.seq_len} tokens of the "
            "built-in calibration split, the same tokens for both toolkits (llm-compressor's SparseGPTModifier with "
            "its defaults). "
            "Two evaluation domains, 8192 tokens each in windows of 512: 1, held-out help pages (base perplexity "
            f"{bases[0]:.3f}); 2, license texts no calibration reads (`--eval-also licenses`, base {bases[1]:.3f}). "
            "KL: mean KL(base || result) per position; top-1: positions whose most likely next token is unchanged. "
            "compress's rows are measured on the checkpoint "
            "reloaded by plain "
            "transformers (sparse storage: densified by compress first), llm-compressor's on its in-memory model after "
            "`oneshot`. "
            f"Time: the prune stage or the `oneshot` call, same run, {os.cpu_count()} CPU cores. Unstructured and 2:4 "
            "sparsity stored dense keep the file size"
            + (
                f"; `--storage sparse` (bitmask + values) takes {packed['bytes'] / packed['base_bytes']:.3f}x the "
                f"bytes of the dense bf16 checkpoint and reads back "
                f"{'bit-identical to' if identical else 'DIFFERENT from'} the dense run's weights"
                if identical is not None
                else ""
            )
            + f".{llmc_note}",
            "",
            *table,
            "",
            (
                f"Structured speed on CPU ({structured['latency_note']}): prefill "
                f"{speed['prefill']:.2f}x (rounds {speed['prefill_range'][0]:.2f}-{speed['prefill_range'][1]:.2f}), "
                f"decode {speed['decode']:.2f}x (rounds {speed['decode_range'][0]:.2f}-{speed['decode_range'][1]:.2f}) "
                f"the base's tokens/s, both timed in one process with {speed['rounds']} interleaved rounds each"
                + (" (the machine was busy: the ratios spread too widely to state one)" if speed["noisy"] else "")
                + "."
                if speed
                else ""
            ),
        ]
    )
    print(section)
    if identical is False:
        sys.exit("sparse storage did not read back bit-identical")
    if not args.no_write:
        write_section("prune", section)


if __name__ == "__main__":
    main()
